"""Pooling: MaxPool and AveragePool over any number of spatial dims (the window kernel of
``codegen/templates/pool.py``), GlobalAveragePool and GlobalMaxPool (row reductions over the
spatial dims)."""

from __future__ import annotations

import functools
import itertools

import numpy as np

from rtxjit.codegen.templates.pool import render_pool
from rtxjit.codegen.view import contiguous_strides
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ops.conv import AUTO_PADS, WindowGeometry
from rtxjit.ops.reduce import WIDE_LIMIT, row_reduce
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ir.symint import prod



def _out_dim(size: int, k: int, s: int, d: int, pb: int, pe: int, ceil_mode: int) -> int:
    """ONNX's (and PyTorch's) output length; with ceil_mode the last window must start inside
    the input or its begin pad."""
    span = size + pb + pe - ((k - 1) * d + 1)
    n = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (n - 1) * s >= size + pb:
        n -= 1
    return n


def geometry(spatial, kernel_shape, strides, pads, dilations, ceil_mode, auto_pad) -> WindowGeometry:
    """Resolve the ONNX pooling attributes over the concrete ``spatial`` input shape."""
    rank = len(kernel_shape)
    if len(spatial) != rank:
        raise ShapeError(f"kernel_shape {list(kernel_shape)} does not match {len(spatial)} spatial dims")
    if auto_pad not in AUTO_PADS:
        raise ModelError(f"auto_pad '{auto_pad}' must be one of {AUTO_PADS}")
    kernel = tuple(int(k) for k in kernel_shape)
    strides = tuple(int(s) for s in strides) if strides else (1,) * rank
    dilations = tuple(int(d) for d in dilations) if dilations else (1,) * rank
    pads = tuple(int(p) for p in pads) if pads else (0,) * (2 * rank)
    begin, end = list(pads[:rank]), list(pads[rank:])
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        for i, (n, k, s, d) in enumerate(zip(spatial, kernel, strides, dilations)):
            total = max((-(-n // s) - 1) * s + (k - 1) * d + 1 - n, 0)
            small, big = total // 2, total - total // 2
            begin[i], end[i] = (small, big) if auto_pad == "SAME_UPPER" else (big, small)
        ceil_mode = 0
    elif auto_pad == "VALID":
        begin, end, ceil_mode = [0] * rank, [0] * rank, 0
    out = tuple(_out_dim(n, k, s, d, pb, pe, ceil_mode)
                for n, k, s, d, pb, pe in zip(spatial, kernel, strides, dilations, begin, end))
    if any(o <= 0 for o in out):
        raise ShapeError(f"pooling window {kernel} does not fit the input {tuple(spatial)}")
    return WindowGeometry(kernel, strides, dilations, tuple(begin), tuple(end), out)


def _geometry_of(shape, attrs: dict) -> WindowGeometry:
    return geometry(shape[2:], attrs["kernel_shape"], attrs["strides"], attrs["pads"], attrs["dilations"],
                    attrs["ceil_mode"], attrs["auto_pad"])


def _pool_type(x: TensorType, attrs: dict) -> TensorType:
    if x.rank < 3:
        raise ShapeError(f"pooling needs an N, C, spatial... input, got rank {x.rank}")
    if len(attrs["kernel_shape"]) != x.rank - 2:
        raise ShapeError(f"kernel_shape {list(attrs['kernel_shape'])} does not match input {x}")
    if not x.static:
        return x.with_shape(x.shape[:2] + ("?",) * (x.rank - 2))
    return x.with_shape(x.shape[:2] + _geometry_of(x.shape, attrs).out)


# ---- numpy reference ---------------------------------------------------------------------------

def _windows(x: np.ndarray, g: WindowGeometry, count_bounds):
    """Per window offset: the values (NaN outside the input), whether each position is counted
    (inside ``count_bounds``, a (lo, hi) pair per dim) and its flat spatial index (row-major)."""
    spatial = x.shape[2:]
    for js in itertools.product(*[range(k) for k in g.kernel]):
        pos = [np.arange(o) * s - pb + j * d
               for o, s, pb, j, d in zip(g.out, g.strides, g.pads_begin, js, g.dilations)]
        clipped = [np.clip(p, 0, n - 1) for p, n in zip(pos, spatial)]
        inside = _outer_and([(p >= 0) & (p < n) for p, n in zip(pos, spatial)])
        counted = _outer_and([(p >= lo) & (p < hi) for p, (lo, hi) in zip(pos, count_bounds)])
        values = x[np.ix_(np.arange(x.shape[0]), np.arange(x.shape[1]), *clipped)]
        flat = sum(i * st for i, st in zip(np.ix_(*clipped), contiguous_strides(spatial)))
        yield np.where(inside, values, np.nan), counted, flat


def _outer_and(masks: list) -> np.ndarray:
    return functools.reduce(np.logical_and, np.ix_(*masks))


def _max_pool_ref(x, g: WindowGeometry, storage_order: int):
    bounds = [(0, n) for n in x.shape[2:]]
    best = np.full(x.shape[:2] + g.out, -np.inf)
    arg = np.zeros(x.shape[:2] + g.out, np.int64)
    for values, _, flat in _windows(x.astype(np.float64), g, bounds):
        take = values > best
        best = np.where(take, values, best)
        arg = np.where(take, flat, arg)
    if storage_order:
        arg = _column_major(arg, x.shape[2:])
    plane = int(np.prod(x.shape[2:]))
    arg = arg + plane * np.arange(x.shape[0] * x.shape[1]).reshape(x.shape[:2] + (1,) * len(g.out))
    return best.astype(x.dtype), arg


def _column_major(flat: np.ndarray, spatial) -> np.ndarray:
    return np.ravel_multi_index(np.unravel_index(flat, spatial), spatial, order="F")


def _avg_bounds(spatial, g: WindowGeometry, count_include_pad: int) -> list:
    if count_include_pad:
        return [(-pb, n + pe) for n, pb, pe in zip(spatial, g.pads_begin, g.pads_end)]
    return [(0, n) for n in spatial]


def _avg_pool_ref(x, g: WindowGeometry, count_include_pad: int):
    total = np.zeros(x.shape[:2] + g.out)
    count = np.zeros(g.out)
    for values, counted, _ in _windows(x, g, _avg_bounds(x.shape[2:], g, count_include_pad)):
        total += np.nan_to_num(values)
        count += counted
    return total / count


# ---- lowering ----------------------------------------------------------------------------------

POOL_CAP = 256  # outputs per program on the GPU


def _pool_block(n: int, interpret: bool) -> int:
    cap = 4096 if interpret else POOL_CAP
    block = 64
    while block < n and block < cap:
        block *= 2
    return block


def lower_pool(ctx, x, g: WindowGeometry, mode: str, count_include_pad: int = 0, storage_order: int = 0,
               p: int = 2) -> None:
    """Launch the window kernel: ``mode`` "max" (with Indices if the node asks), "avg" or "lp"."""
    out = ctx.outputs[0]
    indices = ctx.outputs[1] if len(ctx.outputs) > 1 else None
    if not x.contiguous:
        tmp = ctx.temp(x.dtype, x.shape)
        ctx.copy(x, tmp)
        x = tmp
    spatial = x.shape[2:]
    strides = contiguous_strides(spatial)
    n = out.numel
    src = render_pool(mode, x.dtype, len(spatial), indices is not None,
                      wide=max(n, x.numel) > WIDE_LIMIT, p=p)
    args = [ctx.ptr(x), x.offset, ctx.ptr(out), out.offset]
    if indices is not None:
        args += [ctx.ptr(indices), indices.offset]
    args += [n, prod(spatial), *spatial, *g.out, *g.kernel, *g.strides,
             *g.pads_begin, *g.dilations, *strides]
    if mode == "avg":
        bounds = _avg_bounds(spatial, g, count_include_pad)
        args += [lo for lo, _ in bounds] + [hi for _, hi in bounds]
    if indices is not None:
        args += list(contiguous_strides(spatial[::-1])[::-1] if storage_order else strides)
    block = _pool_block(n, ctx.interpret)
    generic = (-(-n // POOL_CAP),), {"BLOCK": POOL_CAP}
    ctx.launch(src, (-(-n // block),), args, generic=generic, BLOCK=block)


# ---- MaxPool / AveragePool ---------------------------------------------------------------------

@op("MaxPool", since=12, kind=Kind.POOL,
    samples=[Sample([Rand((2, 3, 7, 7))], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
             Sample([Rand((1, 2, 6, 5))], {"kernel_shape": [2, 3], "ceil_mode": 1, "strides": [2, 2]},
                    outputs=2),
             Sample([Rand((1, 2, 7, 6))], {"kernel_shape": [3, 2], "dilations": [2, 1], "pads": [2, 1, 1, 0]}),
             Sample([Rand((1, 2, 7, 6))], {"kernel_shape": [3, 2], "auto_pad": "SAME_UPPER"}),
             Sample([Rand((1, 2, 5, 6))], {"kernel_shape": [2, 2], "auto_pad": "SAME_LOWER",
                                           "storage_order": 1}, outputs=2),
             Sample([Rand((2, 3, 9))], {"kernel_shape": [3], "strides": [2], "auto_pad": "VALID"}),
             Sample([Rand((2, 3, 10))], {"kernel_shape": [3], "dilations": [2], "pads": [1, 2], "ceil_mode": 1,
                                         "strides": [2]}, outputs=2),
             Sample([Rand((1, 2, 5, 6, 5))], {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2],
                                              "pads": [1, 1, 1, 1, 1, 1]}, outputs=2),
             Sample([Rand((1, 2, 4, 5, 6))], {"kernel_shape": [1, 3, 2], "strides": [1, 2, 2], "pads": [0, 1, 0, 0, 1, 1],
                                              "ceil_mode": 1, "storage_order": 1}, outputs=2)])
def max_pool(x: TensorType, *, kernel_shape, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None,
             pads=None, storage_order: int = 0, strides=None, _outputs: int = 1):
    y = _pool_type(x, dict(kernel_shape=kernel_shape, auto_pad=auto_pad, ceil_mode=ceil_mode,
                           dilations=dilations, pads=pads, strides=strides))
    return (y, y.with_dtype(DType.INT64))[:_outputs]


@max_pool.reference
def _(x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, storage_order=0,
      strides=None, _outputs=1):
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    return _max_pool_ref(x, g, storage_order)[:_outputs]


@max_pool.lower
def _(ctx, x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, storage_order=0,
      strides=None):
    if x.dtype is DType.BOOL:
        raise UnsupportedOpError(f"{ctx.where}: MaxPool of bool is not supported")
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    lower_pool(ctx, x, g, "max", storage_order=storage_order)


@op("AveragePool", since=11, kind=Kind.POOL,
    samples=[Sample([Rand((2, 3, 7, 7))], {"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
             Sample([Rand((2, 3, 7, 7))], {"kernel_shape": [3, 3], "pads": [1, 0, 2, 1],
                                           "count_include_pad": 1}),
             Sample([Rand((1, 2, 6, 5))], {"kernel_shape": [2, 3], "ceil_mode": 1, "strides": [2, 2]}),
             Sample([Rand((1, 2, 7, 6))], {"kernel_shape": [3, 2], "auto_pad": "SAME_LOWER",
                                           "count_include_pad": 1}),
             Sample([Rand((1, 2, 8, 7))], {"kernel_shape": [2, 3], "dilations": [2, 2], "pads": [1, 1, 1, 1],
                                           "count_include_pad": 1}),
             Sample([Rand((2, 3, 9))], {"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}),
             Sample([Rand((2, 3, 10))], {"kernel_shape": [4], "strides": [3], "pads": [2, 1], "ceil_mode": 1}),
             Sample([Rand((1, 2, 5, 6, 5))], {"kernel_shape": [3, 3, 3], "strides": [2, 2, 2],
                                              "pads": [1, 1, 1, 1, 1, 1], "count_include_pad": 1}),
             Sample([Rand((1, 2, 4, 5, 6))], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1], "dilations": [1, 1, 2],
                                              "pads": [1, 0, 1, 0, 1, 0]}),
             Sample([Rand((1, 2, 4, 5, 6))], {"kernel_shape": [2, 3, 2], "strides": [2, 2, 1], "auto_pad": "SAME_LOWER",
                                              "count_include_pad": 1})])
def avg_pool(x: TensorType, *, kernel_shape, auto_pad: str = "NOTSET", ceil_mode: int = 0,
             count_include_pad: int = 0, dilations=None, pads=None, strides=None) -> TensorType:
    if not x.dtype.is_float:
        raise ModelError(f"AveragePool of {x.dtype.short} (a float type is needed)")
    return _pool_type(x, dict(kernel_shape=kernel_shape, auto_pad=auto_pad, ceil_mode=ceil_mode,
                              dilations=dilations, pads=pads, strides=strides))


@avg_pool.reference
def _(x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None, pads=None,
      strides=None):
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    return _avg_pool_ref(x, g, count_include_pad).astype(x.dtype)


@avg_pool.lower
def _(ctx, x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, count_include_pad=0, dilations=None,
      pads=None, strides=None):
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    lower_pool(ctx, x, g, "avg", count_include_pad=count_include_pad)


# ---- LpPool ------------------------------------------------------------------------------------

@op("LpPool", since=18, kind=Kind.POOL,
    samples=[Sample([Rand((1, 3, 6, 6))], {"kernel_shape": [2, 2]}),
             Sample([Rand((2, 2, 7, 5))], {"kernel_shape": [3, 2], "strides": [2, 1], "pads": [1, 0, 1, 1], "p": 1}),
             Sample([Rand((1, 2, 9))], {"kernel_shape": [3], "dilations": [2], "p": 3}),
             Sample([Rand((1, 2, 5, 6))], {"kernel_shape": [2, 3], "auto_pad": "SAME_UPPER", "p": 2})])
def lp_pool(x: TensorType, *, kernel_shape, auto_pad: str = "NOTSET", ceil_mode: int = 0, dilations=None,
            pads=None, strides=None, p: int = 2) -> TensorType:
    if not x.dtype.is_float:
        raise ModelError(f"LpPool of {x.dtype.short} (a float type is needed)")
    if int(p) < 1:
        raise ModelError(f"LpPool p={p} (a positive integer is needed)")
    return _pool_type(x, dict(kernel_shape=kernel_shape, auto_pad=auto_pad, ceil_mode=ceil_mode,
                              dilations=dilations, pads=pads, strides=strides))


@lp_pool.reference
def _(x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, strides=None, p=2):
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    total = np.zeros(x.shape[:2] + g.out)
    for values, _, _ in _windows(x.astype(np.float64), g, [(0, n) for n in x.shape[2:]]):
        total += np.abs(np.nan_to_num(values)) ** int(p)  # outside the input: zeros
    return (total ** (1.0 / int(p))).astype(x.dtype)


@lp_pool.lower
def _(ctx, x, *, kernel_shape, auto_pad="NOTSET", ceil_mode=0, dilations=None, pads=None, strides=None, p=2):
    g = geometry(x.shape[2:], kernel_shape, strides, pads, dilations, ceil_mode, auto_pad)
    lower_pool(ctx, x, g, "lp", p=int(p))


# ---- GlobalAveragePool / GlobalMaxPool ---------------------------------------------------------

_GLOBAL_SAMPLES = [Sample([Rand((2, 3, 7, 7))]), Sample([Rand((1, 4, 5))]), Sample([Rand((2, 2, 3, 4, 2))]),
                   Sample([Rand((1, 3, 4, 6, 5))])]


def _global_infer(x: TensorType) -> TensorType:
    if x.rank < 3:
        raise ShapeError(f"global pooling needs an N, C, spatial... input, got rank {x.rank}")
    return x.with_shape(x.shape[:2] + (1,) * (x.rank - 2))


def _declare_global(name: str, mode: str, ref) -> None:
    def lower(ctx, x):
        row_reduce(ctx, x, list(range(2, x.rank)), mode, ctx.outputs[0])

    d = op(name, since=1, kind=Kind.ROW, samples=_GLOBAL_SAMPLES)(_global_infer)
    d.reference(lambda x: ref(x, axis=tuple(range(2, x.ndim)), keepdims=True))
    d.lower(lower)


_declare_global("GlobalAveragePool", "mean", np.mean)
_declare_global("GlobalMaxPool", "max", np.max)
