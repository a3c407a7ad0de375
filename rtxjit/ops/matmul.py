"""Matrix products: MatMul (numpy's matmul) and Gemm, both lowered onto the tiled ``tl.dot`` template.

Operands reach the kernel as strided views: Gemm's transA / transB permute a view, MatMul's
broadcast batch dims get stride 0 and its 1-D operands become a 1-row or 1-column matrix. Gemm's C
is the template's bias epilogue. Only float types run on the device; integer products of
host-known values are still evaluated on the host by the reference.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.epilogue import FusedEpilogue
from rtxjit.codegen.templates.matmul import (generic_tile_config, render_matmul, render_matmul_split_sum, split_programs,
                                             tile_configs, tile_count, unit_strides)
from rtxjit.codegen.view import View
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import DType, TensorType, broadcast_shapes
from rtxjit.ir.symint import prod, pow2

DOT_TYPES = (DType.FP32, DType.FP16, DType.BF16, DType.FP64)


def check_dot_type(ctx, dtype: DType) -> None:
    """The templates multiply fp32, fp16, bf16 and fp64; integer and fp8 products are a clear error."""
    if dtype not in DOT_TYPES:
        raise UnsupportedOpError(f"{ctx.where}: {ctx.node.op} of {dtype.short} is not supported "
                                 f"(rtxjit runs it for {', '.join(d.short for d in DOT_TYPES)})")


def _same_dtype(op_name: str, *xs: TensorType) -> DType:
    dtypes = {x.dtype for x in xs if x is not None}
    if len(dtypes) != 1:
        raise ModelError(f"{op_name} inputs have different dtypes {sorted(d.short for d in dtypes)}")
    return dtypes.pop()


def _check_inner(op_name: str, k_a, k_b) -> None:
    if isinstance(k_a, int) and isinstance(k_b, int) and k_a != k_b:
        raise ShapeError(f"{op_name}: inner dimensions {k_a} and {k_b} differ")


def take_epilogue(ctx, product_dtype, shape) -> tuple:
    """``(FusedEpilogue or None, extra input views broadcast to shape)``: the fused epilogue the
    lowering of an ``rtxjit.Epilogue`` node left on ``ctx`` (see ops/fused.py), taken once."""
    if ctx.epilogue is None:
        return None, []
    program, extras = ctx.epilogue  # views of the node's output shape
    ctx.epilogue = None
    extras = [_as_shape(ctx, e, tuple(shape)) for e in extras]
    uniform = tuple(k for k, e in enumerate(extras) if not any(e.strides))  # one element read everywhere
    return FusedEpilogue.of(program, product_dtype, tuple(e.dtype for e in extras), owner=ctx.node,
                            uniform=uniform), extras


def _as_shape(ctx, view: View, shape: tuple) -> View:
    """``view`` seen with the product kernel's output shape (a 1x1 Conv runs as ``[N, C, H*W]``)."""
    if view.shape == shape:
        return view
    try:
        return view.reshape(shape)
    except ValueError:
        return ctx.contiguous(view).reshape(shape)


def epilogue_args(ctx, fused, extras: list, strides) -> list:
    """Launch arguments of a fused epilogue: each extra's pointer, offset and ``strides(view)``,
    then the program's scalars."""
    if fused is None:
        return []
    args = []
    for e in extras:
        args += [ctx.ptr(e), e.offset, *strides(e)]
    return args + list(fused.scalars)


def emit_matmul(ctx, a: View, b: View, out: View, bias: View = None, alpha: float = 1.0,
                beta: float = 1.0, b_scale: View = None, a_norm: tuple = None, a_rows: View = None) -> None:
    """Launch ``out = alpha * (a @ b) + beta * bias`` where ``a`` is ``[..., M, K]``, ``b`` is
    ``[..., K, N]``, ``out`` is ``[..., M, N]`` and the batch dims of ``a``, ``b`` and ``bias``
    broadcast to those of ``out``. ``b_scale`` (``[..., K]``) scales the rows of ``b`` first.
    ``a_norm`` ``(mode, colsum, eps)`` (no batch dims; ``colsum`` a view over N, layernorm only):
    rtxjit.NormMatMul's LayerNorm / RMSNorm of ``a``'s rows, inside the product. ``a_rows`` (no batch
    dims; contiguous int64 ``[M]``): row ``m`` of the product reads row ``a_rows[m]`` of ``a``
    (rtxjit.RowGatherMatMul)."""
    check_dot_type(ctx, a.dtype)
    batch = out.shape[:-2]
    m, n, k = out.shape[-2], out.shape[-1], a.shape[-1]
    one = (prod(batch) == 1 and b_scale is None and a_norm is None
           and a_rows is None)
    splits, k_per = _splits(ctx, m, n, k, a.dtype) if one else (1, k)
    if splits > 1 and _emit_split(ctx, a, b, out, bias, alpha, beta, splits, k_per):
        return
    views = [out, a.broadcast_to(batch + a.shape[-2:]), b.broadcast_to(batch + b.shape[-2:])]
    if bias is not None:
        views.append(bias.broadcast_to(out.shape))
    if b_scale is not None:  # seen as [..., K, 1]: its strides go where a matrix operand's do
        views.append(b_scale.broadcast_to(batch + (k,)).reshape(batch + (k, 1)))
    # the batch rank is the graph's, never collapsed by value: a symbolic batch of 1 or of 3 runs
    # the same kernel source
    unit = unit_strides(out_sm=out.strides[-2], out_sn=out.strides[-1], a_sm=views[1].strides[-2],
                        a_sk=views[1].strides[-1], b_sk=views[2].strides[-2], b_sn=views[2].strides[-1])
    fused, extras = take_epilogue(ctx, a.dtype, out.shape)
    norm = [a_norm[1].broadcast_to((n,))] if a_norm and a_norm[1] is not None else []
    norm += [] if a_rows is None else [a_rows]  # pointer and offset only, after the norm's column sums
    src = render_matmul(a.dtype, out.dtype, len(batch), bias is not None, wide=ctx.needs_wide(*views, *extras),
                        unit=unit, fused=fused, b_scale=b_scale is not None, a_norm=a_norm[0] if a_norm else None,
                        a_rows=a_rows is not None)
    args = []
    for v in views + norm:
        args += [ctx.ptr(v), v.offset]
    args += [float(alpha)] + ([float(beta)] if bias is not None else []) + ([float(a_norm[2])] if a_norm else [])
    args += [m, n, k]  # then each view's matrix strides, in the template's order
    for v in views:
        args += list(v.strides[-2:])
    args += [v.strides[0] for v in norm if v is not a_rows]
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides[-2:])
    for d, size in enumerate(batch):
        args += [size] + [v.strides[d] for v in views + extras]
    nbatch = prod(batch)
    weight = ctx.is_constant(b) and not batch  # B a weight: N and K are the model's, the same in every binding
    launch_tiles(ctx, src, args, m, n, k, a.dtype, nbatch, weight_nk=(n, k) if weight else None)


def launch_tiles(ctx, src, args: list, m: int, n: int, k: int, dtype, nbatch: int, k_cap: int = None,
                 weight_nk: tuple = None) -> None:
    """Launch a tiled product kernel (MatMul's or Conv's) over ``[m, n]`` tiles times ``nbatch``,
    with the candidate tile configurations of ``tile_configs``, timed on first use on a GPU.
    ``weight_nk``: N and K of a product with a constant B, for the fallback's configuration."""
    cfgs = tile_configs(m, n, k, dtype, ctx.interpret, sm=ctx.sm or 90, sm_count=ctx.sm_count, batch=nbatch,
                        k_cap=k_cap)
    choices = [((tile_count(m, n, c), nbatch), c) for c in cfgs]
    generic = generic_tile_config(a_dtype=dtype, k_cap=k_cap, weight_nk=weight_nk, sm=ctx.sm or 90)
    ctx.launch_tuned(src, choices, args, ctx.tune_key(src, m, n, k, nbatch),
                     generic=((tile_count(m, n, generic), nbatch), generic))


# Split-K (templates/matmul.py's ``split``): "auto" splits K of a product (no batch, or a batch of
# one) whose output tiles fill less than half of the GPU's SMs (on a GPU only); "off" never; an int
# forces about that many splits (tests).
SPLIT_K = "auto"
SPLIT_MAX = 16
SPLIT_MIN_STEPS = 2  # K steps of the largest candidate BLOCK_K per split, at least
# True: the last split of each tile adds the partials and runs the epilogue (one launch, arrival
# counters; templates/matmul.split_fixup); False: a second kernel does (one more launch per product)
SPLIT_FIXUP = True
SPLIT_SUM_TILE = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 16, "GROUP_M": 8, "EVEN_K": False, "num_warps": 4}


def _splits(ctx, m: int, n: int, k: int, dtype: DType) -> tuple:
    """``(splits, k_per)``: K in ``splits`` ranges of ``k_per`` (a multiple of every candidate
    ``BLOCK_K``), or ``(1, k)``. ``auto``: about one wave of ``sm_count`` programs where the first
    candidate tile configuration gives fewer than half that, each split at least
    ``SPLIT_MIN_STEPS`` K steps."""
    if SPLIT_K == "off" or dtype is DType.FP64 or not all(isinstance(d, int) for d in (m, n, k)) or (
            SPLIT_K == "auto" and ctx.interpret):
        return 1, k
    cfgs = tile_configs(m, n, k, dtype, ctx.interpret, sm=ctx.sm or 90, sm_count=ctx.sm_count)
    if SPLIT_K == "auto":
        programs = split_programs(m, n, cfgs[0])
        if 2 * programs > ctx.sm_count:
            return 1, k
        want = -(-ctx.sm_count // programs)
    else:
        want = int(SPLIT_K)
    step = max([c["BLOCK_K"] for c in cfgs] + [generic_tile_config(a_dtype=dtype)["BLOCK_K"]])
    most = k // (step * SPLIT_MIN_STEPS)
    if most < 2:
        return 1, k
    splits = min(want, most, SPLIT_MAX)
    k_per = -(-(-(-k // splits)) // step) * step
    return -(-k // k_per), k_per


def _emit_split(ctx, a: View, b: View, out: View, bias, alpha: float, beta: float, splits: int, k_per: int) -> bool:
    """A product with one (or no) batch index in ``splits`` K ranges: fp32 partials into a
    ``[splits, M, N]`` workspace, then ``render_matmul_split_sum`` adds them and runs the epilogue.
    False (nothing launched) where the views do not drop their batch dims of size 1."""
    m, n, k = out.shape[-2], out.shape[-1], a.shape[-1]
    try:
        a2, b2, o2 = (v.reshape(v.shape[-2:]) for v in (a.broadcast_to(out.shape[:-2] + a.shape[-2:]),
                                                         b.broadcast_to(out.shape[:-2] + b.shape[-2:]), out))
        c2 = None if bias is None else bias.broadcast_to(out.shape).reshape((m, n))
    except ValueError:
        return False
    ws = ctx.temp(DType.FP32, (splits, m, n))
    unit = unit_strides(a_sm=a2.strides[0], a_sk=a2.strides[1], b_sk=b2.strides[0], b_sn=b2.strides[1])
    cfgs = tile_configs(m, n, k, a.dtype, ctx.interpret, sm=ctx.sm or 90, sm_count=ctx.sm_count)
    generic = generic_tile_config(a_dtype=a.dtype)
    choices = [((tile_count(m, n, c), splits), c) for c in cfgs]
    if SPLIT_FIXUP:
        _emit_split_fixup(ctx, a2, b2, o2, c2, ws, alpha, beta, k_per, choices, generic,
                          unit | unit_strides(out_sm=o2.strides[0], out_sn=o2.strides[1]))
        return True
    src = render_matmul(a.dtype, DType.FP32, 0, False, wide=ctx.needs_wide(ws, a2, b2), unit=unit, split=True)
    args = [ctx.ptr(ws), ws.offset, ctx.ptr(a2), a2.offset, ctx.ptr(b2), b2.offset, 1.0, m, n, k, n, 1]
    args += [*a2.strides, *b2.strides, k_per]
    ctx.launch_tuned(src, choices, args,
                     ctx.tune_key(src, m, n, k, splits), generic=((tile_count(m, n, generic), splits), generic))
    fused, extras = take_epilogue(ctx, a.dtype, (m, n))
    views = [o2, ws] + ([] if c2 is None else [c2])
    args = []
    for v in views:
        args += [ctx.ptr(v), v.offset]
    args += [float(alpha)] + ([float(beta)] if c2 is not None else []) + [m, n, splits, *o2.strides]
    args += [] if c2 is None else list(c2.strides)
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides)
    src = render_matmul_split_sum(out.dtype, c2 is not None, wide=ctx.needs_wide(*views, *extras),
                                  unit=unit_strides(out_sm=o2.strides[0], out_sn=o2.strides[1]), fused=fused)
    cfg = split_sum_config(ctx, m, n)
    ctx.launch(src, (tile_count(m, n, cfg),), args, **cfg)
    return True


def _emit_split_fixup(ctx, a2: View, b2: View, o2: View, c2, ws: View, alpha: float, beta: float, k_per: int,
                      choices: list, generic: dict, unit: frozenset) -> None:
    """The split-K product as one launch: the last split of each tile adds the partials in ``ws``
    and runs the epilogue (bias, fused program) into ``o2``, counting arrivals in zeroed counters."""
    m, n, k = o2.shape[0], o2.shape[1], a2.shape[1]
    splits = choices[0][0][1]
    fused, extras = take_epilogue(ctx, a2.dtype, (m, n))
    sem = ctx.counters(max([g[0] for g, _ in choices] + [tile_count(m, n, generic)]))
    src = render_matmul(a2.dtype, o2.dtype, 0, c2 is not None, wide=ctx.needs_wide(ws, a2, b2, o2, *extras),
                        unit=unit, fused=fused, split=True, fixup=True)
    args = [ctx.ptr(o2), o2.offset, ctx.ptr(a2), a2.offset, ctx.ptr(b2), b2.offset]
    args += [] if c2 is None else [ctx.ptr(c2), c2.offset]
    args += [ctx.ptr(ws), ws.offset, ctx.ptr(sem), sem.offset, float(alpha)] + ([float(beta)] if c2 is not None else [])
    args += [m, n, k, *o2.strides, *a2.strides, *b2.strides] + ([] if c2 is None else list(c2.strides))
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides) + [k_per]
    ctx.launch_tuned(src, choices, args, ctx.tune_key(src, m, n, k, splits),
                     generic=((tile_count(m, n, generic), splits), generic))


def split_sum_config(ctx, m: int, n: int) -> dict:
    """The launch configuration of a split-K sum kernel (matmul's or conv's) over ``[m, n]``: fixed
    64 x 64 tiles on a GPU (a memory-bound pass), one large tile on the interpreter."""
    if not ctx.interpret:
        return SPLIT_SUM_TILE
    return dict(SPLIT_SUM_TILE, BLOCK_M=max(16, min(256, pow2(m))), BLOCK_N=max(16, min(64, pow2(n))))




# --- MatMul

@op("MatMul", since=1, kind=Kind.MATMUL,
    samples=[Sample([Rand((5, 7)), Rand((7, 3))]),
             Sample([Rand((2, 1, 4, 6)), Rand((3, 6, 5))]),
             Sample([Rand((6,)), Rand((2, 6, 4))]),
             Sample([Rand((2, 3, 5, 6)), Rand((6,))]),
             Sample([Rand((7,)), Rand((7,))]),
             Sample([Rand((1, 33, 40)), Rand((40, 20))]),
             Sample([Rand((3, 5)), Rand((5, 4))], float_types=("fp64",))])
def matmul(a: TensorType, b: TensorType) -> TensorType:
    dtype = _same_dtype("MatMul", a, b)
    if a.rank == 0 or b.rank == 0:
        raise ShapeError(f"MatMul of a scalar ({a} @ {b})")
    a_shape = (1,) + a.shape if a.rank == 1 else a.shape
    b_shape = b.shape + (1,) if b.rank == 1 else b.shape
    _check_inner("MatMul", a_shape[-1], b_shape[-2])
    batch = broadcast_shapes(a_shape[:-2], b_shape[:-2])
    rows = a_shape[-2:-1] if a.rank > 1 else ()
    cols = b_shape[-1:] if b.rank > 1 else ()
    return TensorType(dtype, batch + rows + cols)


@matmul.reference
def _(a, b):
    return np.matmul(a, b)


@matmul.lower
def _(ctx, a, b):
    a2 = a.reshape((1,) + a.shape) if a.rank == 1 else a
    b2 = b.reshape(b.shape + (1,)) if b.rank == 1 else b
    batch = broadcast_shapes(a2.shape[:-2], b2.shape[:-2])
    out = ctx.outputs[0].reshape(batch + (a2.shape[-2], b2.shape[-1]))
    if b2.rank == 2 and batch:
        a2, out = _fold_batch_into_rows(a2, out)
    emit_matmul(ctx, a2, b2, out)


def _fold_batch_into_rows(a: View, out: View) -> tuple:
    """``[..., M, K] @ [K, N]`` as one ``[prod(...) * M, K] @ [K, N]`` product where the views allow
    it: a ViT's ``[197, 1, 768]`` activations would otherwise run 197 products of one row each."""
    rows = prod(a.shape[:-1])
    try:
        return a.reshape((rows, a.shape[-1])), out.reshape((rows, out.shape[-1]))
    except ValueError:
        return a, out


# --- rtxjit.RowGatherMatMul

@op("rtxjit.RowGatherMatMul", since=1, kind=Kind.MATMUL,
    samples=[Sample([Rand((7, 6)), np.array([3, 0, 6, 6, 1, 2], np.int64), Rand((6, 4))], {"shape": (2, 3)}),
             Sample([Rand((5, 8)), np.array([4, 3, 2, 1], np.int64), Rand((8, 3))], {"shape": (4,)})])
def row_gather_matmul(data: TensorType, rows: TensorType, w: TensorType, *, shape: tuple) -> TensorType:
    """``MatMul(Reshape(Gather(data, rows, axis=0), shape + [K]), w)``, made by
    passes/fuse_row_gather.py where a chain of data movement that carries whole rows (Swin's roll
    and window partition) feeds a product: ``data`` is ``[R, K]``, ``rows`` (int64, in range) one
    row of ``data`` per row of the product, ``w`` ``[K, N]``; the output is ``shape + [N]``. The
    product reads the rows where they are: no gather kernel, no copy."""
    if data.rank != 2 or w.rank != 2 or rows.rank != 1 or rows.dtype is not DType.INT64 or w.dtype != data.dtype:
        raise ShapeError(f"rtxjit.RowGatherMatMul needs a [R, K] input, int64 [M] rows and a [K, N] weight of the "
                         f"input's type, got {data}, {rows} and {w}")
    _check_inner("rtxjit.RowGatherMatMul", data.shape[1], w.shape[0])
    shape = tuple(shape)
    if isinstance(rows.shape[0], int) and all(isinstance(d, int) for d in shape) and int(np.prod(shape)) != rows.shape[0]:
        raise ShapeError(f"rtxjit.RowGatherMatMul: shape {list(shape)} does not hold {rows.shape[0]} rows")
    return TensorType(data.dtype, shape + (w.shape[1],))


@row_gather_matmul.reference
def _(data, rows, w, *, shape):
    return np.matmul(data[rows], w).reshape(tuple(shape) + (w.shape[1],))


@row_gather_matmul.lower
def _(ctx, data, rows, w, *, shape):
    m = prod(tuple(shape))
    emit_matmul(ctx, data, w, ctx.outputs[0].reshape((m, w.shape[1])), a_rows=ctx.contiguous(rows))


# --- rtxjit.NormMatMul

NORM_MODES = ("layernorm", "rmsnorm")


@op("rtxjit.NormMatMul", since=1, kind=Kind.MATMUL,
    samples=[Sample([Rand((4, 8)), Rand((8, 5)), Rand((5,)), Rand((5,))], {"mode": "layernorm"}),
             Sample([Rand((2, 3, 20)), Rand((20, 6)), Rand((6,))], {"mode": "layernorm", "epsilon": 1e-3}),
             Sample([Rand((5, 16)), Rand((16, 7))], {"mode": "rmsnorm", "epsilon": 1e-6}),
             Sample([Rand((3, 9)), Rand((9, 4)), None, Rand((4,))], {"mode": "rmsnorm"})])
def norm_matmul(x: TensorType, w: TensorType, colsum: TensorType = None, bias: TensorType = None, *,
                mode: str, epsilon: float = 1e-5) -> TensorType:
    """``MatMul(norm(x) * g + s, W)`` with ``w = g[:, None] * W``, ``bias = s @ W`` and (layernorm)
    ``colsum`` the column sums of ``w``, made by passes/fuse_norm_matmul.py from a LayerNorm
    (``mode`` "layernorm", statistics in fp32) or RMSNorm ("rmsnorm") over the last axis of ``x``
    that only this product reads (a pre-norm transformer's QKV and MLP input projections):
    ``rstd * (x @ w - mean * colsum) + bias`` (layernorm) or ``rstd * (x @ w) + bias`` (rmsnorm),
    ``mean`` and ``rstd`` of each row of ``x``. The product runs on the raw rows, summing them and
    their squares as it goes, and normalizes in its epilogue: no kernel and no round trip through
    memory for the norm. ``w`` is ``[K, N]``; ``colsum`` and ``bias`` are ``[N]``."""
    if mode not in NORM_MODES:
        raise ModelError(f"rtxjit.NormMatMul: mode '{mode}' is not one of {', '.join(NORM_MODES)}")
    if not x.dtype.is_float or x.rank < 2 or w.rank != 2 or w.dtype != x.dtype:
        raise ShapeError(f"rtxjit.NormMatMul needs a float [..., K] input and a [K, N] weight of its type, "
                         f"got {x} and {w}")
    _check_inner("rtxjit.NormMatMul", x.shape[-1], w.shape[0])
    if (colsum is None) != (mode == "rmsnorm"):
        raise ShapeError(f"rtxjit.NormMatMul: mode {mode} {'needs' if colsum is None else 'takes no'} column sums")
    for name, t in (("colsum", colsum), ("bias", bias)):
        if t is not None and (t.rank != 1 or t.shape[0] != w.shape[1] or not t.dtype.is_float):
            raise ShapeError(f"rtxjit.NormMatMul: {name} {t} must be a float [N]")
    return TensorType(x.dtype, x.shape[:-1] + (w.shape[1],))


@norm_matmul.reference
def _(x, w, colsum=None, bias=None, *, mode, epsilon=1e-5):
    if mode == "layernorm":  # colsum as given (the pass makes it w's column sums)
        mean = x.mean(-1, keepdims=True)
        y = (np.matmul(x, w) - mean * colsum) / np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + epsilon)
    else:
        y = np.matmul(x, w) / np.sqrt((x * x).mean(-1, keepdims=True) + epsilon)
    return y + (0 if bias is None else bias)


@norm_matmul.lower
def _(ctx, x, w, colsum=None, bias=None, *, mode, epsilon=1e-5):
    rows = prod(x.shape[:-1])
    try:
        a = x.reshape((rows, x.shape[-1]))
    except ValueError:
        a = ctx.contiguous(x).reshape((rows, x.shape[-1]))
    out = ctx.outputs[0].reshape((rows, w.shape[1]))
    emit_matmul(ctx, a, w, out, bias.broadcast_to((rows, w.shape[1])) if bias is not None else None,
                a_norm=(mode, colsum, epsilon))


# --- Gemm

@op("Gemm", since=7, kind=Kind.MATMUL,
    samples=[Sample([Rand((4, 6)), Rand((6, 5)), Rand((5,))]),
             Sample([Rand((6, 4)), Rand((6, 5)), Rand((4, 1))], {"transA": 1, "alpha": 0.5, "beta": 2.0}),
             Sample([Rand((4, 6)), Rand((5, 6)), Rand((4, 5))], {"transB": 1, "beta": -1.5}),
             Sample([Rand((3, 7)), Rand((7, 2))], {"alpha": 3.0}),
             Sample([Rand((7, 3)), Rand((2, 7)), Rand(())], {"transA": 1, "transB": 1}),
             Sample([Rand((18, 40)), Rand((40, 33)), Rand((1, 33))])])
def gemm(a: TensorType, b: TensorType, c: TensorType = None, *, alpha: float = 1.0, beta: float = 1.0,
         transA: int = 0, transB: int = 0) -> TensorType:
    dtype = _same_dtype("Gemm", a, b, c)
    if a.rank != 2 or b.rank != 2:
        raise ShapeError(f"Gemm needs 2-D A and B, got {a} and {b}")
    m, k_a = a.shape[::-1] if transA else a.shape
    k_b, n = b.shape[::-1] if transB else b.shape
    _check_inner("Gemm", k_a, k_b)
    if c is not None and broadcast_shapes(c.shape, (m, n)) != (m, n):
        raise ShapeError(f"Gemm: C {c} does not broadcast to [{m},{n}]")
    return TensorType(dtype, (m, n))


@gemm.reference
def _(a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    y = alpha * ((a.T if transA else a) @ (b.T if transB else b))
    return y if c is None else y + beta * c


@gemm.lower
def _(ctx, a, b, c=None, *, alpha=1.0, beta=1.0, transA=0, transB=0):
    a = a.permute([1, 0]) if transA else a
    b = b.permute([1, 0]) if transB else b
    emit_matmul(ctx, a, b, ctx.outputs[0], c, alpha, beta)
