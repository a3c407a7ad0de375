"""Tiled matrix products on ``tl.dot``: batched MatMul / Gemm, and the pieces Conv's implicit GEMM
(``templates/conv.py``) shares with it.

One program computes a ``[BLOCK_M, BLOCK_N]`` tile of ``out = alpha * (A @ B) + beta * bias`` over
one batch entry: ``program_id(0)`` walks the tiles, ``program_id(1)`` the batch. Every operand is
``(ptr, offset, strides)``, so a transpose is swapped strides and a broadcast batch dim a zero
stride; nothing is copied. Sizes and strides are run-time arguments: the source depends only on
the dtypes, the batch rank and whether there is a bias, so one compiled kernel serves every shape.

The product accumulates in fp32 (in fp64, without ``tl.dot``, for fp64 operands). fp32 operands
multiply with ``input_precision="ieee"``: the GPU default (tf32) keeps 10 mantissa bits, too few
for fp32's tolerance; fp16 and bf16 use the default (tensor cores, exact products).

Hooks, in the spirit of Inductor's ``triton_mm`` template: ``k_loop`` takes the lines that load the
``a`` and ``b`` tiles (strided here, gathered in Conv); ``epilogue`` is where code fused after the
product (bias, activations) is spliced, between the accumulator and the store.
"""

from __future__ import annotations

import textwrap

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.ir.types import DType

BLOCK_PARAMS = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr"]


def signature(name: str, params: list) -> str:
    """``def name(params...):`` with the block-size constexprs last, wrapped to a readable width."""
    head = f"def {name}("
    text = ", ".join(params + BLOCK_PARAMS) + "):"
    return textwrap.fill(text, width=100, initial_indent=head, subsequent_indent=" " * len(head),
                         break_long_words=False, break_on_hyphens=False)


def int64_suffix(wide: bool) -> str:
    """Widens an index expression when an operand spans more than 2**31 elements."""
    return ".to(tl.int64)" if wide else ""


def tile_indices(wide: bool) -> list:
    """Lines that give the tile's row indices ``rm`` and column indices ``rn`` from program_id(0)."""
    w = int64_suffix(wide)
    return [
        "    pid = tl.program_id(0)",
        "    grid_n = tl.cdiv(N, BLOCK_N)",
        f"    rm = (pid // grid_n) * BLOCK_M + tl.arange(0, BLOCK_M){w}",
        f"    rn = (pid % grid_n) * BLOCK_N + tl.arange(0, BLOCK_N){w}",
    ]


def acc_type(dtype: DType) -> DType:
    """The accumulator type: fp32 for fp32/fp16/bf16 operands, fp64 for fp64 ones."""
    return DType.FP64 if dtype is DType.FP64 else DType.FP32


def k_loop(load_tiles: list, dtype: DType, wide: bool) -> list:
    """Lines of the reduction over K into the tile ``acc`` (of ``acc_type``).

    ``load_tiles`` are loop-body lines (8-space indent) that define the ``[BLOCK_M, BLOCK_K]`` tile
    ``a`` and the ``[BLOCK_K, BLOCK_N]`` tile ``b`` from ``rk``, the K indices of this step.
    """
    return [
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={TL[acc_type(dtype)]})",
        "    for k0 in range(0, K, BLOCK_K):",
        f"        rk = k0 + tl.arange(0, BLOCK_K){int64_suffix(wide)}",
        *load_tiles,
        f"        acc = {_product(dtype)}",
    ]


def _product(dtype: DType) -> str:
    """``acc + a @ b`` for one K step. fp64 has no ``tl.dot`` on the GPU (Triton 3.6 rejects it), so
    it multiplies and sums over a ``[BLOCK_M, BLOCK_K, BLOCK_N]`` tile instead."""
    if dtype is DType.FP64:
        return "acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)"
    if dtype is DType.FP32:
        return 'tl.dot(a, b, acc, input_precision="ieee")'
    return "tl.dot(a, b, acc)"


def epilogue(out_addr: str, out_dtype: DType, has_bias: bool, scaled: bool, cols: str = "rn") -> list:
    """EPILOGUE hook: the accumulator tile ``acc`` becomes ``y``, stored at ``out_addr`` under ``mask``.

    ``y = alpha * acc + beta * bias`` (``scaled``) or ``acc + bias``; the bias is a strided view
    addressed by the tile's rows ``rm`` and columns ``cols``. Fused activations go after the bias.
    """
    lines = ["    # epilogue", f"    y = {'alpha * acc' if scaled else 'acc'}"]
    if has_bias:
        lines += [
            f"    bias_addr = bias_ptr + bias_off + rm[:, None] * bias_sm + {cols}[None, :] * bias_sn",
            f"    bias = tl.load(bias_addr, mask=mask, other=0.0).to({TL[acc_type(out_dtype)]})",
            f"    y = y + {'beta * bias' if scaled else 'bias'}",
        ]
    lines.append(f"    tl.store({out_addr}, y.to({TL[out_dtype]}), mask=mask)")
    return lines


def bias_params(has_bias: bool) -> list:
    """The bias pointer and offset parameters, present only in kernels with a bias epilogue."""
    return ["bias_ptr", "bias_off"] if has_bias else []


def _batch_offsets(operands: list, batch_rank: int, wide: bool) -> list:
    """Lines that split program_id(1) into batch indices and move each operand's offset there."""
    if batch_rank == 0:
        return []
    lines = [f"    rem = tl.program_id(1){int64_suffix(wide)}"]
    for d in reversed(range(1, batch_rank)):
        lines += [f"    i{d} = rem % size{d}", f"    rem = rem // size{d}"]
    lines.append("    i0 = rem")
    for name in operands:
        terms = " + ".join(f"i{d} * {name}_sb{d}" for d in range(batch_rank))
        lines.append(f"    {name}_off = {name}_off + {terms}")
    return lines


def render_matmul(dtype: DType, out_dtype: DType, batch_rank: int, has_bias: bool,
                  wide: bool = False) -> KernelSource:
    """``out[b] = alpha * (a[b] @ b[b]) + beta * bias[b]`` for every batch index ``b``.

    Arguments, in order: ``out, a, b`` (and ``bias``) as pointer and offset; ``alpha`` (and
    ``beta``); ``M, N, K``; the matrix strides of each operand; then per batch dim its size and the
    operands' strides along it. Block sizes are constexprs.
    """
    operands = ["out", "a", "b"] + (["bias"] if has_bias else [])
    params = ["out_ptr", "out_off", "a_ptr", "a_off", "b_ptr", "b_off", *bias_params(has_bias), "alpha"]
    params += ["beta"] if has_bias else []
    params += ["M", "N", "K", "out_sm", "out_sn", "a_sm", "a_sk", "b_sk", "b_sn"]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    for d in range(batch_rank):
        params += [f"size{d}"] + [f"{name}_sb{d}" for name in operands]
    loads = [
        "        a_mask = (rm[:, None] < M) & (rk[None, :] < K)",
        "        a = tl.load(a_ptr + a_off + rm[:, None] * a_sm + rk[None, :] * a_sk, mask=a_mask, other=0.0)",
        "        b_mask = (rk[:, None] < K) & (rn[None, :] < N)",
        "        b = tl.load(b_ptr + b_off + rk[:, None] * b_sk + rn[None, :] * b_sn, mask=b_mask, other=0.0)",
    ]
    lines = [
        signature("matmul", params),
        *_batch_offsets(operands, batch_rank, wide),
        *tile_indices(wide),
        *k_loop(loads, dtype, wide),
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        *epilogue("out_ptr + out_off + rm[:, None] * out_sm + rn[None, :] * out_sn", out_dtype, has_bias, True),
    ]
    header = f"matmul in={dtype.short} out={out_dtype.short} batch_rank={batch_rank} bias={has_bias}"
    return render("matmul", header, "\n".join(lines))


def tile_config(m: int, n: int, k: int, dtype: DType, interpret: bool) -> dict:
    """Block sizes (and warps) for a product of this size: each a power of two, at least 16 (the
    smallest ``tl.dot`` tile), no larger than the problem needs.

    On the GPU, 64x64x32 with 4 warps is a moderate default for every SM. Triton's interpreter runs
    each program in Python with numpy tiles, so there fewer, larger tiles are faster: a 256^3 fp32
    MatMul took 7.1 s with 16^3 tiles, 230 ms with 64x64x32, 161 ms with 128^3 and 24 ms with 256^3.
    fp64 multiplies in a 3-D tile (see ``_product``), so its blocks stay small.
    """
    if dtype is DType.FP64:
        caps = (32, 32, 16)
    else:
        caps = (256, 256, 256) if interpret else (64, 64, 32)
    blocks = [max(16, min(cap, _next_pow2(d))) for d, cap in zip((m, n, k), caps)]
    return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2], "num_warps": 4}


def tile_count(m: int, n: int, cfg: dict) -> int:
    """Programs along ``program_id(0)``: the ``[BLOCK_M, BLOCK_N]`` tiles that cover ``[m, n]``."""
    return -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
