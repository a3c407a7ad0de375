"""com.microsoft MatMulNBits: ``Y = A @ dequant(B)^T + bias``, onnxruntime's weight-only quantized
MatMul (its contrib op schema, docs/ContribOperators.md), as onnxruntime's MatMulNBitsQuantizer
writes it (``quant_format=QOperator``) for LLM weights.

- ``A [..., K]`` (fp32 / fp16 / bf16); ``B`` uint8 ``[N, ceil(K / block_size), block_size * bits / 8]``
  (any shape of that many bytes), the weight transposed (``[N, K]``), quantized along K in blocks,
  bit-packed inside each block (4 bits: low nibble first); ``scales [N, k_blocks]`` of A's type.
- ``zero_points``: packed uint8 (``[N, ceil(k_blocks * bits / 8)]``, packed as B) or of A's type
  (``[N, k_blocks]``, HQQ's float zero points); absent: ``2 ** (bits - 1)``. Every form dequantizes
  as ``(q - zero_point) * scale`` (onnxruntime's kernels; the float form too).
- ``g_idx`` (deprecated in the schema, from GPTQ's act-order): ``int32 [K]``, the block of each K
  index, so ``W[n, k] = (q[n, k] - zp[n, g_idx[k]]) * scale[n, g_idx[k]]``. It must be a constant
  (read on the host at lowering, checked to lie in ``[0, k_blocks)``); the identity grouping
  ``k // block_size`` is dropped. onnxruntime's CPU kernel disagrees where ``g_idx`` is given: it
  reads ``g_idx[block * block_size + i]`` for the i-th of each 8 values (right only for the
  identity grouping) and, with packed zero points, drops them (uses 8: onnxruntime 1.32's
  ``DequantizeBlockwise`` never assigns the unpacked value); tests compare with the reference.
- ``bias [N]``.
- ``accuracy_level`` is accepted and ignored: it lets onnxruntime compute with lower-precision
  activations (4: A quantized to int8 per block); rtxjit always multiplies A in its own type with
  an fp32 accumulator, which is level 1 for fp32 A (the most accurate: compare onnxruntime at
  level 1). ``weight_prepacked`` (a CUDA EP layout) other than 0 is refused by name, as are bits
  other than 4 and 8 and an empty (omitted-projection) B.

Lowering (codegen/templates/quant_gemm.py): the packed bytes are read and dequantized inside the
product's K loop, never written out dequantized; a GEMV for M <= GEMV_ROWS rows (decode), a ``tl.dot``
GEMM above. rtxjit/quant/fuse.py rewrites block-wise int4 / int8 DequantizeLinear -> MatMul into
this op, so QDQ models run the same kernels.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.templates.quant_gemm import gemv_grid, nbits_configs, render_nbits, render_split_reduce, split_k
from rtxjit.codegen.templates.matmul import _next_pow2, tile_count
from rtxjit.errors import ModelError, ShapeError, UnsupportedOpError
from rtxjit.ir.registry import Kind, Rand, Sample, Unknown, known, op
from rtxjit.ir.types import DType, TensorType
from rtxjit.ops.matmul import epilogue_args, take_epilogue
from rtxjit.quant.qlinear import host_constants
from rtxjit.ir.symint import prod

FLOATS = (DType.FP32, DType.FP16, DType.BF16)
GEMV_ROWS = 4  # up to this many rows of A: the GEMV form (decode shapes); more take tl.dot tiles of 16
# rows (at 16 rows the GEMV multiplied a [16, 8, 256] fp32 tile in registers: bench_quant mlp_int4_b16 ran
# 1.68 ms, its fp16 model 0.19 ms, on an H100)
GEMV4_ROWS = 16  # the 4-bit GEMV (gemv4_lines) up to this many rows, blocks of 32 and more:
# from 5 rows its tensor-core form (the dequantizing GEMM ran mlp_int4_b16 in 1.22 ms on an H100)


def _gemv(rows: int, bits: int, block_size: int, g_idx, dtype: DType) -> bool:
    """Whether a product of ``rows`` rows takes the GEMV form."""
    if rows <= GEMV_ROWS:
        return True
    return rows <= GEMV4_ROWS and bits == 4 and g_idx is None and block_size >= 32 and dtype in FLOATS


def packed_shape(n: int, k: int, bits: int, block_size: int) -> tuple:
    """``(N, k_blocks, blob_size)`` of B."""
    k_blocks = -(-k // block_size)
    return n, k_blocks, block_size * bits // 8


def _numel(t) -> int:
    return int(np.prod(t.shape)) if t.static else -1


def _check(name, a, b, scales, zero, g_idx, bias, K, N, bits, block_size, weight_prepacked) -> None:
    if bits not in (4, 8):
        raise UnsupportedOpError(f"{name}: bits={bits} is not supported (rtxjit runs 4 and 8)")
    if block_size < 16 or block_size & (block_size - 1):
        raise ModelError(f"{name}: block_size={block_size} (a power of two, at least 16, is needed)")
    if weight_prepacked:
        raise UnsupportedOpError(f"{name}: weight_prepacked={weight_prepacked} (an execution provider's own "
                                 "layout) is not supported; quantize the model without prepacking")
    if a.dtype not in FLOATS:
        raise ModelError(f"{name}: A of {a.dtype.short} (a float type is needed)")
    if a.rank == 0 or (isinstance(a.shape[-1], int) and a.shape[-1] != K):
        raise ShapeError(f"{name}: A of shape {list(a.shape)} for K={K} (its last dim must be K)")
    n, k_blocks, blob = packed_shape(N, K, bits, block_size)
    if b.dtype is not DType.UINT8:
        raise ModelError(f"{name}: B of {b.dtype.short} (packed uint8 is needed)")
    if b.static and 0 in b.shape:
        raise UnsupportedOpError(f"{name}: an empty B (an omitted projection) is not supported")
    if b.static and _numel(b) != n * k_blocks * blob:
        raise ShapeError(f"{name}: B of shape {list(b.shape)} for N={N}, K={K}, bits={bits}, "
                         f"block_size={block_size} (expected {[n, k_blocks, blob]})")
    if scales.dtype is not a.dtype:
        raise ModelError(f"{name}: scales of {scales.dtype.short} for A of {a.dtype.short} (they must match)")
    if scales.static and _numel(scales) != n * k_blocks:
        raise ShapeError(f"{name}: scales of shape {list(scales.shape)} (expected {[n, k_blocks]})")
    if zero is not None:
        if zero.dtype is DType.UINT8:
            want = n * -(-k_blocks * bits // 8)
        elif zero.dtype is a.dtype:
            want = n * k_blocks
        else:
            raise ModelError(f"{name}: zero_points of {zero.dtype.short} (packed uint8 or A's {a.dtype.short})")
        if zero.static and _numel(zero) != want:
            raise ShapeError(f"{name}: zero_points of shape {list(zero.shape)} ({want} values expected)")
    if g_idx is not None:
        if isinstance(g_idx, TensorType):  # behind rtxjit.Epilogue: types only
            gt = g_idx
        else:
            gt = g_idx.type if isinstance(g_idx, Unknown) else TensorType(DType.from_numpy(g_idx.dtype), g_idx.shape)
        if gt.dtype is not DType.INT32 or (gt.static and gt.shape != (K,)):
            raise ModelError(f"{name}: g_idx of {gt} (int32 [K={K}] is needed)")
    if bias is not None and (bias.dtype is not a.dtype or (bias.static and bias.shape != (N,))):
        raise ShapeError(f"{name}: bias of {bias} (A's type, shape [N={N}], is needed)")


def unpack(raw: np.ndarray, bits: int, rows: int, count: int) -> np.ndarray:
    """``[rows, count]`` integers from bytes packed ``bits`` per value, low bits first."""
    raw = np.asarray(raw, np.uint8).reshape(rows, -1)
    if bits == 4:
        raw = np.stack([raw & 15, raw >> 4], axis=-1).reshape(rows, -1)
    return raw[:, :count].astype(np.int64)


def dequantized_weight(b, scales, zero, g_idx, *, K, N, bits, block_size) -> np.ndarray:
    """``W [N, K]`` in float64, as the op's schema defines it."""
    _, k_blocks, _ = packed_shape(N, K, bits, block_size)
    q = unpack(b, bits, N, k_blocks * block_size)[:, :K]
    groups = np.arange(K) // block_size if g_idx is None else np.asarray(g_idx, np.int64)
    s = np.asarray(scales, np.float64).reshape(N, k_blocks)[:, groups]
    if zero is None:
        z = float(1 << (bits - 1))
    elif np.asarray(zero).dtype == np.uint8:
        z = unpack(zero, bits, N, k_blocks)[:, groups]
    else:
        z = np.asarray(zero, np.float64).reshape(N, k_blocks)[:, groups]
    return (q - z) * s


def _attrs_samples() -> list:
    def sample(m, k, n, bits, block, zero=None, g_idx=None, bias=False, **kw):
        nn, kb, blob = packed_shape(n, k, bits, block)
        inputs = [Rand((m, k)), Rand((nn, kb, blob), "uint8", 0, 255), Rand((nn, kb), None, 0.01 / 16 ** (bits == 8), 0.1 / 16 ** (bits == 8))]
        if zero == "packed":
            inputs.append(Rand((nn, -(-kb * bits // 8)), "uint8", 0, 255))
        elif zero == "float":
            inputs.append(Rand((nn, kb), None, 4.0, 11.0))
        else:
            inputs.append(None)
        inputs.append(g_idx)
        inputs.append(Rand((n,)) if bias else None)
        while inputs[-1] is None:
            inputs.pop()
        return Sample(inputs, {"K": k, "N": n, "bits": bits, "block_size": block, **kw}, **(
            {"float_types": ("fp32",)} if g_idx is not None else {}))

    return [sample(3, 48, 24, 4, 16),
            sample(2, 40, 17, 4, 16, zero="packed", bias=True),  # K not a multiple of the block, odd N
            sample(20, 64, 24, 4, 32, zero="packed"),  # the GEMM form (M > 16)
            sample(2, 64, 12, 8, 16, zero="packed", bias=True, accuracy_level=1),
            sample(18, 96, 8, 8, 32),
            sample(2, 64, 8, 4, 16, zero="float"),
            sample(1, 24, 10, 4, 64, zero="packed", bias=True),  # a K step inside one block
            sample(12, 64, 24, 4, 32, zero="packed", bias=True),  # fp16: the GEMV's tensor-core form
            sample(6, 96, 20, 4, 32),
            sample(2, 48, 8, 4, 16, g_idx=(np.arange(48) // 16).astype(np.int32))]


@op("MatMulNBits", since=1, kind=Kind.MATMUL, domain="com.microsoft", host_inputs=(4,), samples=_attrs_samples())
def matmul_nbits(a: TensorType, b: TensorType, scales: TensorType, zero_points: TensorType = None, g_idx=None,
                 bias: TensorType = None, *, K: int, N: int, bits: int = 4, block_size: int,
                 accuracy_level: int = 0, weight_prepacked: int = 0) -> TensorType:
    _check("MatMulNBits", a, b, scales, zero_points, g_idx, bias, K, N, bits, block_size, weight_prepacked)
    return TensorType(a.dtype, a.shape[:-1] + (N,))


@matmul_nbits.reference
def _(a, b, scales, zero_points=None, g_idx=None, bias=None, *, K, N, bits=4, block_size, accuracy_level=0,
      weight_prepacked=0):
    w = dequantized_weight(b, scales, zero_points, g_idx, K=K, N=N, bits=bits, block_size=block_size)
    y = np.asarray(a, np.float64) @ w.T
    if bias is not None:
        y = y + np.asarray(bias, np.float64)
    return y.astype(np.asarray(a).dtype)


@matmul_nbits.lower
def _(ctx, a, b, scales, zero_points=None, g_idx=None, bias=None, *, K, N, bits=4, block_size, accuracy_level=0,
      weight_prepacked=0):
    if g_idx is not None:
        g_idx = host_constants(ctx, [g_idx], 4)[0]
    n, k_blocks, blob = packed_shape(N, K, bits, block_size)
    rows = prod(a.shape[:-1])
    out = ctx.outputs[0].reshape((rows, N))
    fused, extras = take_epilogue(ctx, a.dtype, (rows, N))
    if rows == 0:
        return
    a2 = ctx.contiguous(a).reshape((rows, K))
    views = [out, a2, ctx.contiguous(b), ctx.contiguous(scales)]
    zero = "none"
    if zero_points is not None:
        zero = "packed" if zero_points.dtype is DType.UINT8 else "float"
        views.append(ctx.contiguous(zero_points))
    groups = _groups(ctx, g_idx, K, block_size, k_blocks)
    if groups is not None:
        views.append(ctx.const(groups))
    if bias is not None:
        views.append(bias.broadcast_to((rows, N)))
    gemv = _gemv(rows, bits, block_size, groups, a.dtype)
    block4 = block_size if gemv and bits == 4 and groups is None else 0  # the 4-bit GEMV (gemv4_lines)
    cfgs = nbits_configs(rows, N, K, gemv, ctx.interpret, a.dtype, ctx.sm or 90, ctx.sm_count, block4=block4)
    splits, k_per = split_k(N, K, cfgs, ctx.sm_count) if gemv else (1, K)
    if splits > 1:  # fp32 partials to a workspace; bias and epilogue in the reduction
        ws = ctx.temp(DType.FP32, (splits, rows, N))
        _launch_nbits(ctx, [ws.reshape((splits * rows, N))] + views[1:len(views) - (bias is not None)], a.dtype,
                      bits, block_size, zero, groups, None, (), rows, N, K, cfgs, split=(splits, k_per))
        _launch_split_reduce(ctx, out, ws, bias if bias is None else views[-1], fused, extras, rows, N, splits)
        return
    _launch_nbits(ctx, views, a.dtype, bits, block_size, zero, groups, fused, extras, rows, N, K, cfgs)


def _launch_nbits(ctx, views, a_dtype, bits, block_size, zero, groups, fused, extras, rows, N, K, cfgs, split=None):
    """One product kernel over ``views`` (out, a, b, scales, [zero points], [g_idx], [bias]);
    ``split``: ``(splits, k_per)`` of a split-K GEMV writing fp32 partials into ``views[0]``."""
    has_bias = len(views) > 4 + (zero != "none") + (groups is not None)
    gemv = _gemv(rows, bits, block_size, groups, a_dtype)
    k_blocks = -(-K // block_size)
    src = render_nbits(a_dtype, bits, block_size, zero, groups is not None, has_bias, gemv,
                       wide=ctx.needs_wide(*views, *extras), fused=fused, split=split is not None)
    args = []
    for v in views:
        args += [ctx.ptr(v), v.offset]
    args += [rows, N, K, N, K, k_blocks * block_size * bits // 8, k_blocks]
    if zero == "packed":
        args.append(-(-k_blocks * bits // 8))
    if split is not None:
        args += [split[1], rows * N]
    if has_bias:
        args += list(views[-1].strides)
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides)
    splits = 1 if split is None else split[0]
    grid = (lambda c: gemv_grid(N, c) + ((splits,) if splits > 1 else ())) if gemv else (
        lambda c: (tile_count(rows, N, c),))
    ctx.launch_tuned(src, [(grid(c), c) for c in cfgs], args, ctx.tune_key(src, rows, N, K))


def _launch_split_reduce(ctx, out, ws, bias, fused, extras, rows: int, n: int, splits: int) -> None:
    views = [out, ws] + ([] if bias is None else [bias])
    src = render_split_reduce(out.dtype, bias is not None, wide=ctx.needs_wide(*views, *extras), fused=fused)
    args = []
    for v in views:
        args += [ctx.ptr(v), v.offset]
    args += [rows, n, splits, n] + ([] if bias is None else list(bias.strides))
    args += epilogue_args(ctx, fused, extras, lambda e: e.strides)
    bm = max(1, _next_pow2(rows))
    bn = max(16, min(1024 // bm, _next_pow2(n)))
    ctx.launch(src, (-(-n // bn),), args, BLOCK_M=bm, BLOCK_N=bn)


def _groups(ctx, g_idx, k: int, block_size: int, k_blocks: int):
    """``g_idx`` as int32 block indices to upload, or None where absent or the identity grouping."""
    if g_idx is None:
        return None
    if not known(g_idx):
        raise UnsupportedOpError(f"{ctx.where}: g_idx must be a constant")
    g = np.asarray(g_idx).astype(np.int64).reshape(-1)
    if g.size != k or g.min(initial=0) < 0 or g.max(initial=0) >= k_blocks:
        raise ModelError(f"{ctx.where}: g_idx holds block indices outside [0, {k_blocks})")
    if np.array_equal(g, np.arange(k) // block_size):
        return None
    return g.astype(np.int32)
