"""Normalizations over groups of channels: InstanceNormalization, GroupNormalization and the internal
``rtxjit.GroupNorm`` (made by ``passes/fuse_group_norm.py``: a group norm with per-channel scale and
bias and, optionally, the pointwise chain that read it, such as SiLU), all lowered onto the
group-norm template (``codegen/templates/groupnorm.py``) by ``emit_group_norm``.

Versions. GroupNormalization changed its meaning at version 21, so it is declared twice below (the
registry resolves a node to the newest declaration not above its version, rtxjit/ir/registry.py):
version 18 (opsets 18 to 20) takes scale and bias per *group* ([G]), and its statistics run in x's
compute type; version 21 takes them per *channel* ([C]) and adds stash_type, the type statistics
run in. Both run the one kernel; version 18's per-group scale and bias are first spread to one
value per channel (two copies of C elements). InstanceNormalization has had one meaning since
version 6 (22 only adds types).
"""

from __future__ import annotations

import math

import numpy as np

from rtxjit.codegen.dtypes import compute_type
from rtxjit.codegen.templates.epilogue import FusedEpilogue
from rtxjit.codegen.templates.groupnorm import render_group_norm, render_group_norm_stats
from rtxjit.codegen.view import View, collapse
from rtxjit.errors import InternalError, ModelError, ShapeError, UnsupportedOpError
from rtxjit.ops.fused import program_reference, program_type
from rtxjit.ops.matmul import epilogue_args
from rtxjit.ops.reduce import GENERIC_ROW_BLOCKS, WIDE_LIMIT, row_blocks
from rtxjit.ir.registry import Kind, Rand, Sample, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ir.symint import pow2

# ---- the shared lowering -----------------------------------------------------------------------

SPLIT_CHUNK = 4096  # columns per part of a split row: a row longer than this is split ...
SPLIT_MAX_ROWS = 512  # ... where there are fewer rows than this (more fill the GPU one per program)
MAX_PARTS = 256
SPLIT_BLOCK_C = 1024  # column block of the split kernels on the GPU
INTERPRET_BLOCK_C = 4096  # the interpreter's (it pays per program and per block, not per element)
STASH_TYPES = {1: DType.FP32, 11: DType.FP64}  # stash_type -> the type statistics accumulate in


def group_norm_reference(x: np.ndarray, scale: np.ndarray, bias: np.ndarray, groups: int, eps: float):
    """float64 group norm of ``[N, C, ...]`` with per-channel scale and bias."""
    n, c = x.shape[:2]
    g = x.astype(np.float64).reshape(n, groups, -1)
    mean = g.mean(-1, keepdims=True)
    var = ((g - mean) ** 2).mean(-1, keepdims=True)
    y = ((g - mean) / np.sqrt(var + eps)).reshape(x.shape)
    per_channel = (1, c) + (1,) * (x.ndim - 2)
    return y * scale.astype(np.float64).reshape(per_channel) + bias.astype(np.float64).reshape(per_channel)


def _split(n_rows: int, n_cols: int, interpret: bool):
    """``(chunk, parts, BLOCK_C)`` where rows are split into parts, else None."""
    if n_rows >= SPLIT_MAX_ROWS or n_cols <= SPLIT_CHUNK:
        return None
    chunk = max(SPLIT_CHUNK, -(-n_cols // MAX_PARTS))
    block_c = INTERPRET_BLOCK_C if interpret else SPLIT_BLOCK_C
    chunk = -(-chunk // block_c) * block_c
    return chunk, -(-n_cols // chunk), block_c


def _extra_view(ctx, e: View, shape: tuple) -> tuple:
    """``(view, (sn, sc, ss))``: an extra input of the fused program addressed by (sample, channel,
    flat spatial index); copied dense where its spatial dims do not collapse to one stride."""
    e = e.broadcast_to(shape)
    sshape, (sst,) = collapse(shape[2:], e.strides[2:])
    if len(sshape) > 1:
        e = ctx.contiguous(e)
        sshape, (sst,) = collapse(shape[2:], e.strides[2:])
    return e, (e.strides[0], e.strides[1], sst[0])


def emit_group_norm(ctx, x: View, scale: View, bias: View, groups: int, eps: float, acc: DType,
                    program: tuple = (), extras: tuple = ()) -> None:
    """``ctx.outputs[0] = program((x - mean) * rstd * scale[c] + bias[c], *extras)`` with mean and
    rstd over each (n, group of ``groups``) of ``x`` ``[N, C, ...]``; statistics in ``acc``."""
    out = ctx.outputs[0]
    if x.numel == 0:
        return
    if not out.contiguous:
        raise InternalError(f"{ctx.where}: the group-norm kernel writes a contiguous output")
    x = ctx.contiguous(x)
    n, c = x.shape[0], x.shape[1]
    spatial = math.prod(x.shape[2:])
    n_rows, n_cols = n * groups, c // groups * spatial
    placed = [_extra_view(ctx, e, x.shape) for e in extras]
    views = [v for v, _ in placed]
    fused = FusedEpilogue.of(program, x.dtype, tuple(v.dtype for v in views), owner=ctx.node) if program else None
    wide = x.numel > WIDE_LIMIT or ctx.needs_wide(x, out, *views)
    split = _split(n_rows, n_cols, ctx.interpret)
    src = render_group_norm(x.dtype, out.dtype, acc, split=split is not None, fused=fused, wide=wide)
    args = [ctx.ptr(x), x.offset, ctx.ptr(out), out.offset]
    for p in (scale, bias):
        args += [ctx.ptr(p), p.offset, p.strides[0]]
    if split is not None:
        chunk, parts, block_c = split
        partial = ctx.temp(acc, (n_rows, parts, 2))
        stats = render_group_norm_stats(x.dtype, acc, wide=wide)
        ctx.launch(stats, (n_rows, parts), [ctx.ptr(x), x.offset, ctx.ptr(partial), partial.offset, n_cols, chunk,
                                            parts],
                   generic=((n_rows, parts), {"BLOCK_C": SPLIT_BLOCK_C}), BLOCK_C=block_c)
        args += [ctx.ptr(partial), partial.offset]
    else:
        chunk, parts = n_cols, 1
    strides = {id(v): s for v, s in placed}
    args += epilogue_args(ctx, fused, views, lambda v: strides[id(v)])
    args += [n_rows, n_cols, groups, c // groups, spatial, chunk, parts, float(eps)]
    if split is not None:
        generic = (n_rows, parts), {"BLOCK_R": 1, "BLOCK_C": SPLIT_BLOCK_C, "ONE_BLOCK": False,
                                    "BLOCK_P": MAX_PARTS}
        ctx.launch(src, (n_rows, parts), args, generic=generic, BLOCK_R=1, BLOCK_C=block_c, ONE_BLOCK=False,
                   BLOCK_P=pow2(parts))
        return
    block_r, block_c, one = row_blocks(n_rows, n_cols, ctx.interpret)
    gen_r, gen_c = GENERIC_ROW_BLOCKS
    generic = (-(-n_rows // gen_r),), {"BLOCK_R": gen_r, "BLOCK_C": gen_c, "ONE_BLOCK": False, "BLOCK_P": 1}
    ctx.launch(src, (-(-n_rows // block_r),), args, generic=generic, BLOCK_R=block_r, BLOCK_C=block_c,
               ONE_BLOCK=one, BLOCK_P=1)




def _check_group_norm(name: str, x: TensorType, scale: TensorType, bias: TensorType, groups,
                      per_group: bool = False) -> None:
    """x is a float ``[N, C, ...]``; scale and bias of x's type, ``[C]`` (``[groups]`` where
    ``per_group``); C divides into the groups."""
    if not x.dtype.is_float:
        raise ModelError(f"{name} of {x.dtype.short} (a float type is needed)")
    if x.rank < 2:
        raise ShapeError(f"{name} needs an input of rank >= 2 ([N, C, ...]), got shape {list(x.shape)}")
    c = x.shape[1]
    size, per = (groups, "group") if per_group else (c, "channel")
    for what, t in (("scale", scale), ("bias", bias)):
        if t.dtype is not x.dtype:
            raise ModelError(f"{name}: {what} of {t.dtype.short} for an input of {x.dtype.short}")
        if t.rank != 1 or (isinstance(t.shape[0], int) and isinstance(size, int) and t.shape[0] != size):
            raise ShapeError(f"{name}: {what} of shape {list(t.shape)}, one value per {per} ([{size}]) is needed")
    if not isinstance(groups, int) or groups < 1:
        raise ModelError(f"{name}: num_groups={groups} (a positive number is needed)")
    if isinstance(c, int) and c % groups:
        raise ShapeError(f"{name}: {c} channels do not divide into num_groups={groups}")


# ---- InstanceNormalization ---------------------------------------------------------------------

@op("InstanceNormalization", since=6, kind=Kind.ROW,
    samples=[Sample([Rand((2, 3, 4, 5)), Rand((3,)), Rand((3,))]),
             Sample([Rand((2, 4, 7), None, 1.0, 3.0), Rand((4,)), Rand((4,))], {"epsilon": 1e-2}),
             Sample([Rand((1, 2, 3, 2, 4)), Rand((2,)), Rand((2,))]),
             # rows of 6400: split in two parts (statistics, then the normalizing pass)
             Sample([Rand((1, 2, 80, 80), None, 0.5, 4.0), Rand((2,)), Rand((2,))], float_types=("fp32",))])
def instance_norm(x: TensorType, scale: TensorType, bias: TensorType, *, epsilon: float = 1e-5) -> TensorType:
    """Each (n, c) normalized over its spatial elements: the group norm with one channel per group."""
    _check_group_norm("InstanceNormalization", x, scale, bias, 1)
    return x


@instance_norm.reference
def _(x, scale, bias, *, epsilon=1e-5):
    return group_norm_reference(x, scale, bias, x.shape[1], epsilon)


@instance_norm.lower
def _(ctx, x, scale, bias, *, epsilon=1e-5):
    emit_group_norm(ctx, x, scale, bias, x.shape[1], epsilon, compute_type(x.dtype))


# ---- GroupNormalization, version 18: scale and bias per group ----------------------------------

@op("GroupNormalization", since=18, kind=Kind.ROW,
    samples=[Sample([Rand((2, 6, 4, 4)), Rand((3,)), Rand((3,))], {"num_groups": 3}, opset=18),
             Sample([Rand((2, 8, 5), None, -1.0, 3.0), Rand((2,)), Rand((2,))], {"num_groups": 2, "epsilon": 1e-3},
                    opset=18),
             Sample([Rand((1, 4, 3, 2, 3)), Rand((4,)), Rand((4,))], {"num_groups": 4}, opset=20),
             Sample([Rand((3, 4)), Rand((1,)), Rand((1,))], {"num_groups": 1}, opset=18),
             # rows of 5120 (2 groups of 2 channels of 64x40): split in two parts
             Sample([Rand((1, 4, 64, 40)), Rand((2,)), Rand((2,))], {"num_groups": 2}, float_types=("fp32",),
                    opset=18)])
def group_normalization_18(x: TensorType, scale: TensorType, bias: TensorType, *, num_groups: int,
                           epsilon: float = 1e-5) -> TensorType:
    _check_group_norm("GroupNormalization-18", x, scale, bias, num_groups, per_group=True)
    return x


def _per_channel(ctx, p: View, channels: int) -> View:
    """A per-group ``[G]`` parameter as ``[C]``, each group's value repeated for its channels."""
    groups = p.shape[0]
    if groups == channels:
        return p
    return ctx.contiguous(p.reshape((groups, 1)).broadcast_to((groups, channels // groups))).reshape((channels,))


@group_normalization_18.reference
def _(x, scale, bias, *, num_groups, epsilon=1e-5):
    per = x.shape[1] // num_groups
    return group_norm_reference(x, np.repeat(scale, per), np.repeat(bias, per), num_groups, epsilon)


@group_normalization_18.lower
def _(ctx, x, scale, bias, *, num_groups, epsilon=1e-5):
    c = x.shape[1]
    emit_group_norm(ctx, x, _per_channel(ctx, scale, c), _per_channel(ctx, bias, c), num_groups, epsilon,
                    compute_type(x.dtype))


# ---- GroupNormalization, version 21: scale and bias per channel, stash_type -------------------

@op("GroupNormalization", since=21, kind=Kind.ROW,
    samples=[Sample([Rand((2, 6, 4, 4)), Rand((6,)), Rand((6,))], {"num_groups": 3}),
             Sample([Rand((2, 8, 5), None, -1.0, 3.0), Rand((8,)), Rand((8,))], {"num_groups": 2, "epsilon": 1e-3}),
             Sample([Rand((1, 4, 3, 2, 3)), Rand((4,)), Rand((4,))], {"num_groups": 4}),
             Sample([Rand((3, 4)), Rand((4,)), Rand((4,))], {"num_groups": 1}),
             # rows of 5120 (2 groups of 2 channels of 64x40): split in two parts
             Sample([Rand((1, 4, 64, 40)), Rand((4,)), Rand((4,))], {"num_groups": 2}, float_types=("fp32",))])
def group_normalization_21(x: TensorType, scale: TensorType, bias: TensorType, *, num_groups: int,
                           epsilon: float = 1e-5, stash_type: int = 1) -> TensorType:
    _check_group_norm("GroupNormalization", x, scale, bias, num_groups)
    if stash_type not in STASH_TYPES:
        raise UnsupportedOpError(f"GroupNormalization stash_type={stash_type} is not supported (statistics run "
                                 "in fp32 (1) or fp64 (11))")
    return x


@group_normalization_21.reference
def _(x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    return group_norm_reference(x, scale, bias, num_groups, epsilon)


@group_normalization_21.lower
def _(ctx, x, scale, bias, *, num_groups, epsilon=1e-5, stash_type=1):
    emit_group_norm(ctx, x, scale, bias, num_groups, epsilon, STASH_TYPES[stash_type])


# ---- rtxjit.GroupNorm --------------------------------------------------------------------------

@op("rtxjit.GroupNorm", since=1, kind=Kind.ROW)
def fused_group_norm(x: TensorType, scale: TensorType, bias: TensorType, *extras: TensorType, num_groups: int,
                     epsilon: float = 1e-5, program: tuple = ()) -> TensorType:
    """GroupNormalization-21 (statistics in x's compute type) followed by ``program``, a pointwise
    chain over ``[normalized, *extras]`` (rtxjit/codegen/compose.py) applied before the store."""
    _check_group_norm("rtxjit.GroupNorm", x, scale, bias, num_groups)
    if not program:
        return x
    out = program_type(program, [x, *extras])
    if out.shape != x.shape:
        raise ShapeError(f"rtxjit.GroupNorm: the fused program must keep the input's shape {list(x.shape)}, "
                         f"got {list(out.shape)}")
    return out


@fused_group_norm.reference
def _(x, scale, bias, *extras, num_groups, epsilon=1e-5, program=()):
    y = group_norm_reference(x, scale, bias, num_groups, epsilon)
    return program_reference(program, [y, *extras]) if program else y


@fused_group_norm.lower
def _(ctx, x, scale, bias, *extras, num_groups, epsilon=1e-5, program=()):
    emit_group_norm(ctx, x, scale, bias, num_groups, epsilon, compute_type(x.dtype), program, extras)
