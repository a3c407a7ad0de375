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
from rtxjit.codegen.source import KernelSource, memoized, render
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

BLOCK_PARAMS = ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr", "BLOCK_K: tl.constexpr",
                "GROUP_M: tl.constexpr", "EVEN_K: tl.constexpr"]


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
    """Lines that give the tile's row indices ``rm`` and column indices ``rn`` from program_id(0).

    Tiles are walked in groups of ``GROUP_M`` tile rows, column by column inside a group, so the
    programs that run at the same time share rows of A and columns of B in L2 (Triton's matmul
    tutorial's "grouped ordering"); ``GROUP_M = 1`` is plain row-major order.
    """
    w = int64_suffix(wide)
    return [
        "    pid = tl.program_id(0)",
        "    grid_m = tl.cdiv(M, BLOCK_M)",
        "    grid_n = tl.cdiv(N, BLOCK_N)",
        "    group_width = GROUP_M * grid_n",
        "    first_m = (pid // group_width) * GROUP_M",
        "    group_rows = tl.minimum(grid_m - first_m, GROUP_M)",
        "    pid_m = first_m + (pid % group_width) % group_rows",
        "    pid_n = (pid % group_width) // group_rows",
        f"    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M){w}",
        f"    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N){w}",
    ]


def acc_type(dtype: DType) -> DType:
    """The accumulator type: fp32 for fp32/fp16/bf16 operands, fp64 for fp64 ones."""
    return DType.FP64 if dtype is DType.FP64 else DType.FP32


def k_loop(load_tiles: list, dtype: DType, wide: bool, split: bool = False) -> list:
    """Lines of the reduction over K into the tile ``acc`` (of ``acc_type``).

    ``load_tiles`` are loop-body lines (8-space indent) that define the ``[BLOCK_M, BLOCK_K]`` tile
    ``a`` and the ``[BLOCK_K, BLOCK_N]`` tile ``b`` from ``rk``, the K indices of this step.
    ``split``: only ``[split * k_per, (split + 1) * k_per)`` of K (``k_per`` a multiple of
    ``BLOCK_K``, ``split`` defined before), for a split-K product.
    """
    steps = (["    k_lo = split * k_per", "    for k0 in range(k_lo, tl.minimum(K, k_lo + k_per), BLOCK_K):"]
             if split else ["    for k0 in range(0, K, BLOCK_K):"])
    return [
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={TL[acc_type(dtype)]})",
        *steps,
        f"        rk = k0 + tl.arange(0, BLOCK_K){int64_suffix(wide)}",
        *load_tiles,
        f"        acc = {product(dtype)}",
    ]


def product(dtype: DType) -> str:
    """``acc + a @ b`` for one K step. fp64 has no ``tl.dot`` on the GPU (Triton 3.6 rejects it), so
    it multiplies and sums over a ``[BLOCK_M, BLOCK_K, BLOCK_N]`` tile instead."""
    if dtype is DType.FP64:
        return "acc + tl.sum(a[:, :, None] * b[None, :, :], axis=1)"
    if dtype is DType.FP32:
        return 'tl.dot(a, b, acc, input_precision="ieee")'
    return "tl.dot(a, b, acc)"


def epilogue(out_addr: str, out_dtype: DType, has_bias: bool, scaled: bool, cols: str = "rn",
             fused=None, fused_addr=None, before: list = ()) -> list:
    """EPILOGUE hook: the accumulator tile ``acc`` becomes ``y``, stored at ``out_addr`` under ``mask``.

    ``y = alpha * acc + beta * bias`` (``scaled``) or ``acc + bias``; the bias is a strided view
    addressed by the tile's rows ``rm`` and columns ``cols``. A ``fused`` epilogue (a pointwise
    program, see templates/epilogue.py) runs after the bias; ``fused_addr(k)`` addresses its
    extra input ``k`` at the tile.
    """
    lines = ["    # epilogue", *before, f"    y = {'alpha * acc' if scaled else 'acc'}"]
    if has_bias:
        lines += [
            f"    bias_addr = bias_ptr + bias_off + rm[:, None] * bias_sm + {cols}[None, :] * bias_sn",
            f"    bias = tl.load(bias_addr, mask=mask, other=0.0).to({TL[acc_type(out_dtype)]})",
            f"    y = y + {'beta * bias' if scaled else 'bias'}",
        ]
    if fused is not None:
        lines += fused.lines(fused_addr)
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
        lines += [f"    i{d} = rem % bsize{d}", f"    rem = rem // bsize{d}"]
    lines.append("    i0 = rem")
    for name in operands:
        terms = " + ".join(f"i{d} * {name}_sb{d}" for d in range(batch_rank))
        lines.append(f"    {name}_off = {name}_off + {terms}")
    return lines


def scaled(index: str, stride: str, unit: frozenset) -> str:
    """``index * stride``, or ``index`` alone where the view's stride is known to be 1: Triton then
    sees the contiguous axis and loads 16 bytes per access."""
    return index if stride in unit else f"{index} * {stride}"


def masked_load(name: str, addr: str, mask: str, k_mask: str) -> list:
    """Loop-body lines that load ``name`` from ``addr`` under ``mask``, and also under ``k_mask``
    unless ``EVEN_K`` (K a multiple of ``BLOCK_K``: no K tail, so the K loads need no mask)."""
    return [
        "        if EVEN_K:",
        f"            {name} = tl.load({addr}, mask={mask}, other=0.0)",
        "        else:",
        f"            {name} = tl.load({addr}, mask={mask} & {k_mask}, other=0.0)",
    ]


@memoized
def render_matmul(dtype: DType, out_dtype: DType, batch_rank: int, has_bias: bool,
                  wide: bool = False, unit: frozenset = frozenset(), fused=None, split: bool = False,
                  b_scale: bool = False, a_norm: str = None, fixup: bool = False, a_rows: bool = False) -> KernelSource:
    """``out[b] = alpha * (a[b] @ b[b]) + beta * bias[b]`` for every batch index ``b``.

    Arguments, in order: ``out, a, b`` (and ``bias``) as pointer and offset; ``alpha`` (and
    ``beta``); ``M, N, K``; the matrix strides of each operand; then per batch dim its size and the
    operands' strides along it. Block sizes, ``GROUP_M`` and ``EVEN_K`` are constexprs. ``unit``
    names the matrix strides (``a_sk``, ``b_sn``, ...) that are 1 for this launch: a source
    specialization (the argument is still passed), as Triton's own ``== 1`` specialization would be.

    ``split`` (split-K; no batch dims, bias or fused epilogue): program ``(tile, s)`` multiplies K
    range ``[s * k_per, (s + 1) * k_per)`` (``k_per``, one more argument after the strides) and
    stores its fp32 tile into ``out``, a contiguous ``[splits, M, N]`` workspace;
    ``render_matmul_split_sum`` adds the splits and runs the epilogue (alpha, beta * bias, fused).
    A product with few output tiles (bert-base's ``[128, 3072] @ [3072, 768]`` at batch 1: 24 tiles
    of 64 x 64 on 132 SMs, 48 K steps each) then fills the GPU.

    ``a_rows`` (rtxjit.RowGatherMatMul; no batch dims or split): row ``m`` of the product reads row
    ``ar[m]`` of ``a`` (int64 row indices, contiguous; ``ar_ptr, ar_off`` after the other operands'
    pointers): a Gather of whole rows (a Swin window partition) read inside the product.

    ``fixup`` (with ``split``; bias and fused epilogue allowed, ``out`` the product's output): the
    workspace and the tiles' arrival counters are two more operands, ``ws_ptr, ws_off, sem_ptr,
    sem_off`` after the bias's; the last split of a tile to arrive adds the partials and runs the
    epilogue (``split_fixup``), so the product is one launch, not two.

    ``b_scale`` (rtxjit.ScaledConv's channel scale): one more operand ``bs`` (pointer and offset after
    the bias's; strides ``bs_sk, bs_sn`` after the bias's, per batch dim too) scales row ``k`` of
    ``b`` by ``bs[k]`` before the product, rounded to ``b``'s type as the unfused Mul would be.

    ``a_norm`` (rtxjit.NormMatMul: a LayerNorm, mode "layernorm", or RMSNorm, "rmsnorm", over K of
    ``a``'s rows, its scale folded into ``b`` and its shift into the bias by the pass; no batch dims,
    split or b scale): the K loop is the plain product of the raw rows, which also sums each row
    and its squares (fp32); the epilogue turns ``acc`` into ``(acc - mean * cs[n]) * rstd``
    (layernorm; ``cs``: ``b``'s column sums, parameters ``cs_ptr, cs_off`` after the bias's and
    ``cs_sn`` after the operands' strides) or ``acc * rstd`` (rmsnorm), before the bias and fused
    epilogue; ``n_eps`` after alpha and beta.
    """
    if split and (batch_rank or b_scale or (not fixup and (has_bias or fused is not None))):
        raise InternalError("matmul template: split-K has no batch dims or b scale, and a bias or fused epilogue "
                            "only with the fix-up")
    if fixup and not split:
        raise InternalError("matmul template: the fix-up is split-K's")
    if a_rows and (batch_rank or split):
        raise InternalError("matmul template: a_rows has no batch dims or split-K")
    if a_norm is not None and (split or batch_rank or b_scale):
        raise InternalError("matmul template: a_norm has no batch dims, split-K or b scale")
    norm_mode = a_norm
    extras = [f"e{k}" for k in range(len(fused.extra_dtypes))] if fused else []
    operands = ["out", "a", "b"] + (["bias"] if has_bias else []) + (["bs"] if b_scale else []) + extras
    params = ["out_ptr", "out_off", "a_ptr", "a_off", "b_ptr", "b_off", *bias_params(has_bias)]
    params += ["bs_ptr", "bs_off"] if b_scale else []
    params += ["cs_ptr", "cs_off"] if norm_mode == "layernorm" else []
    params += ["ar_ptr", "ar_off"] if a_rows else []
    params += ["ws_ptr", "ws_off", "sem_ptr", "sem_off"] if fixup else []
    params += ["alpha"] + (["beta"] if has_bias else []) + (["n_eps"] if norm_mode else [])
    params += ["M", "N", "K", "out_sm", "out_sn", "a_sm", "a_sk", "b_sk", "b_sn"]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += ["bs_sk", "bs_sn"] if b_scale else []
    params += ["cs_sn"] if norm_mode == "layernorm" else []
    params += fused.params(["sm", "sn"]) if fused else []
    params += ["k_per"] if split else []
    for d in range(batch_rank):
        params += [f"bsize{d}"] + [f"{name}_sb{d}" for name in operands]
    a_index = "a_row[:, None]" if a_rows else "rm[:, None]"
    a_addr = f"a_ptr + a_off + {scaled(a_index, 'a_sm', unit)} + {scaled('rk[None, :]', 'a_sk', unit)}"
    b_addr = f"b_ptr + b_off + {scaled('rk[:, None]', 'b_sk', unit)} + {scaled('rn[None, :]', 'b_sn', unit)}"
    loads = [*masked_load("a", a_addr, "(rm[:, None] < M)", "(rk[None, :] < K)"),
             *masked_load("b", b_addr, "(rn[None, :] < N)", "(rk[:, None] < K)")]
    if b_scale:
        acc = TL[acc_type(dtype)]
        loads += ["        bsc = tl.load(bs_ptr + bs_off + rk * bs_sk, mask=rk < K, other=0.0)",
                  f"        b = (b.to({acc}) * bsc.to({acc})[:, None]).to({TL[dtype]})"]
    stats, normalize = [], []
    if norm_mode:
        stats, sums, normalize = _norm_lines(norm_mode, dtype)
        loads += sums
    out_addr = f"out_ptr + out_off + {scaled('rm[:, None]', 'out_sm', unit)} + {scaled('rn[None, :]', 'out_sn', unit)}"
    if split and fixup:
        store = split_fixup(1, epilogue(out_addr, out_dtype, has_bias, True, fused=fused, fused_addr=_extra_2d))
    elif split:  # fp32 partials to the [splits, M, N] workspace
        store = ["    tl.store(out_ptr + out_off + (split * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)"]
    else:
        store = epilogue(out_addr, out_dtype, has_bias, True, fused=fused, fused_addr=_extra_2d, before=normalize)
    lines = [
        signature("matmul", params),
        *_batch_offsets(operands, batch_rank, wide),
        *tile_indices(wide),
        *([f"    split = tl.program_id(1){int64_suffix(wide)}"] if split else []),
        *(["    a_row = tl.load(ar_ptr + ar_off + rm, mask=rm < M, other=0)"] if a_rows else []),
        *stats,
        *k_loop(loads, dtype, wide, split),
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        *store,
    ]
    header = f"matmul in={dtype.short} out={out_dtype.short} batch_rank={batch_rank} bias={has_bias}"
    header += fused.header() if fused else ""
    header += (" split_k fixup" if fixup else " split_k") if split else ""
    header += " b_scale" if b_scale else ""
    header += f" a_norm={norm_mode}" if norm_mode else ""
    header += " a_rows" if a_rows else ""
    if unit:
        header += f" unit_strides={','.join(sorted(unit))}"
    return render("matmul", header, "\n".join(lines))


def _norm_lines(mode: str, dtype: DType) -> tuple:
    """``(lines before the K loop, lines after the loads in it, lines before the epilogue)`` of
    ``render_matmul``'s ``a_norm``: the rows' sums and sums of squares over K (fp32; zeros past K
    and M add nothing), then mean and 1/std (one-pass variance) or 1/rms applied to ``acc``."""
    acc = TL[acc_type(dtype)]
    before = [f"    n_s1 = tl.zeros((BLOCK_M,), dtype={acc})", f"    n_s2 = tl.zeros((BLOCK_M,), dtype={acc})"]
    sums = [f"        n_x = a.to({acc})", "        n_s1 += tl.sum(n_x, 1)", "        n_s2 += tl.sum(n_x * n_x, 1)"]
    if mode == "layernorm":
        after = ["    n_mean = n_s1 / K",
                 "    n_rstd = 1.0 / tl.sqrt(tl.maximum(n_s2 / K - n_mean * n_mean, 0.0) + n_eps)",
                 f"    n_cs = tl.load(cs_ptr + cs_off + rn * cs_sn, mask=rn < N, other=0.0).to({acc})",
                 "    acc = (acc - n_mean[:, None] * n_cs[None, :]) * n_rstd[:, None]"]
    else:
        after = ["    n_rstd = 1.0 / tl.sqrt(n_s2 / K + n_eps)", "    acc = acc * n_rstd[:, None]"]
    return before, sums, after


def _extra_2d(k: int) -> str:
    """A fused epilogue's extra input ``k`` at the ``[rm, rn]`` tile (templates/epilogue.py)."""
    return f"e{k}_ptr + e{k}_off + rm[:, None] * e{k}_sm + rn[None, :] * e{k}_sn"


def split_sum() -> list:
    """Lines that add a split-K product's fp32 partials, ``ws`` a contiguous ``[splits, M, N]``
    workspace, into ``acc`` at the tile ``[rm, rn]`` under ``mask``, in split order (the same bits
    on every run)."""
    return [
        "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "    for s in range(0, splits):",
        "        acc += tl.load(ws_ptr + ws_off + (s * M + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0)",
    ]


def split_fixup(split_axis: int, finish: list) -> list:
    """Lines after a split-K program's K loop, for one launch instead of a product and a sum kernel:
    the program stores its fp32 tile ``acc`` into the contiguous ``[splits, M, N]`` workspace
    ``ws``, then counts itself in at its tile's arrival counter (``sem``, int32, zero before the
    launch); the last of the tile's splits to arrive adds every split's partial, in split order
    (the same bits as the two-kernel form, whichever program is last), runs ``finish`` (the
    epilogue's lines, from ``acc``) and sets the counter back to zero for the next launch.
    ``split_axis``: the grid axis of the splits; tiles are ``program_id(0)`` (``pid``).

    Ordering: the barrier puts every thread's partial store before the counter's acq_rel add
    (release, gpu scope; Triton makes one thread do a scalar atomic); the last program's add
    acquires the others' stores, and its partial loads bypass L1 (``.cg``)."""
    indented = [f"    {line}" if line.strip() else line for line in finish]
    return [
        "    tl.store(ws_ptr + ws_off + (split * M + rm[:, None]) * N + rn[None, :], acc, mask=mask)",
        "    tl.debug_barrier()",
        '    arrived = tl.atomic_add(sem_ptr + sem_off + pid, 1, sem="acq_rel")',
        f"    if arrived == tl.num_programs({split_axis}) - 1:",
        "        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        f"        for s in range(0, tl.num_programs({split_axis})):",
        "            acc += tl.load(ws_ptr + ws_off + (s * M + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0,",
        '                           cache_modifier=".cg")',
        *indented,
        "        tl.store(sem_ptr + sem_off + pid, 0)",
    ]


@memoized
def render_matmul_split_sum(out_dtype: DType, has_bias: bool, wide: bool = False, unit: frozenset = frozenset(),
                            fused=None) -> KernelSource:
    """The second kernel of a split-K product: ``out = alpha * sum over s of ws[s] + beta * bias``,
    then the fused epilogue. Arguments: ``out, ws`` (and ``bias``) as pointer and offset; ``alpha``
    (and ``beta``); ``M, N, splits``; ``out_sm, out_sn`` (and ``bias_sm, bias_sn``); the fused
    epilogue's. Tiles ``[BLOCK_M, BLOCK_N]`` as the product's."""
    params = ["out_ptr", "out_off", "ws_ptr", "ws_off", *bias_params(has_bias), "alpha"]
    params += ["beta"] if has_bias else []
    params += ["M", "N", "splits", "out_sm", "out_sn"] + (["bias_sm", "bias_sn"] if has_bias else [])
    params += fused.params(["sm", "sn"]) if fused else []
    out_addr = f"out_ptr + out_off + {scaled('rm[:, None]', 'out_sm', unit)} + {scaled('rn[None, :]', 'out_sn', unit)}"
    lines = [
        signature("matmul_split_sum", params),
        *tile_indices(wide),
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        *split_sum(),
        *epilogue(out_addr, out_dtype, has_bias, True, fused=fused, fused_addr=_extra_2d),
    ]
    header = f"matmul_split_sum out={out_dtype.short} bias={has_bias}" + (fused.header() if fused else "")
    if unit:
        header += f" unit_strides={','.join(sorted(unit))}"
    return render("matmul_split_sum", header, "\n".join(lines))


def unit_strides(**strides) -> frozenset:
    """The names among ``strides`` (name=value) whose value is 1, for ``render_matmul``'s ``unit``."""
    return frozenset(name for name, st in strides.items() if st == 1)


# Tile configurations per SM family, for 16-bit operands on tensor cores:
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). Hopper (sm_90) has 228 KB of shared memory
# per SM: 128x256x64 in 3 stages takes 144 KB. Ampere / Ada / consumer Blackwell keep to 32-64 KB
# stages (sm_86/89/120 have about 100 KB); older SMs get 2 stages.
TENSOR_CORE_CONFIGS = {
    90: [(128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 128, 64, 4, 4),
         (128, 64, 64, 4, 4), (64, 128, 64, 4, 4), (64, 256, 64, 8, 4), (64, 64, 64, 4, 4),
         (64, 32, 64, 4, 4), (32, 64, 64, 4, 4)],
    80: [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 32, 4, 4), (64, 128, 32, 4, 4),
         (64, 64, 64, 4, 3), (64, 32, 64, 4, 3), (32, 64, 64, 4, 3)],
    70: [(128, 128, 32, 8, 2), (128, 64, 32, 4, 2), (64, 128, 32, 4, 2), (64, 64, 32, 4, 2),
         (32, 64, 32, 4, 2)],
}
# fp32 operands multiply with input_precision="ieee" (FMA, no tensor cores): moderate tiles.
FP32_CONFIGS = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3), (32, 64, 32, 4, 3),
                (128, 128, 32, 8, 2)]
TUNE_CANDIDATES = 5  # configurations timed by the autotuner, the heuristic's best first


def sm_family(sm: int) -> int:
    """The key of ``TENSOR_CORE_CONFIGS`` for compute capability ``sm`` (80, 90, ... as ints)."""
    if 90 <= sm < 110:  # Hopper and datacenter Blackwell: large shared memory, wgmma / tcgen05
        return 90
    if sm >= 80:  # Ampere, Ada, consumer Blackwell
        return 80
    return 70


def tile_configs(m: int, n: int, k: int, dtype: DType, interpret: bool, sm: int = 90, sm_count: int = 132,
                 batch: int = 1, k_cap: int = None) -> list:
    """Candidate launch configurations for a product of this size, best guess first.

    Each is a dict of constexprs for the launch (``BLOCK_M/N/K``, ``GROUP_M``, ``EVEN_K``,
    ``num_warps``, ``num_stages``). The interpreter and fp64 get one fixed choice. On a GPU the SM
    family's table is clipped to the problem (no block above the next power of two of its dim, at
    least 16; ``BLOCK_K`` also at most ``k_cap``, the K extent one step may cover, e.g. Conv's
    channels per tap) and ranked by an estimate of run time: waves of tiles over ``sm_count`` SMs
    times the tile's work over its efficiency (arithmetic intensity ``BM*BN/(BM+BN)``, saturating at
    128x128). The first ``TUNE_CANDIDATES`` are what the autotuner times. M and the batch (the dims
    a dynamic batch or sequence changes) count rounded up to powers of two, as the autotuner's key rounds them: the
    shapes of one bucket get one list, so a new shape in a bucket seen before compiles nothing
    (resnet50 batch 12 after 16 compiled ~57 specialized kernels).
    """
    if interpret or dtype is DType.FP64:
        return [tile_config(m, n, min(k, k_cap or k), dtype, interpret)]
    table = FP32_CONFIGS if dtype is DType.FP32 else TENSOR_CORE_CONFIGS[sm_family(sm)]
    k_lim = _next_pow2(min(k, k_cap or k))
    m_bucket = _next_pow2(m)  # ranked for M rounded up: every M of a bucket gets the same list (one compile)
    seen, ranked = set(), []
    for bm, bn, bk, warps, stages in table:
        bm, bn = (max(16, min(b, _next_pow2(d))) for b, d in ((bm, m), (bn, n)))
        bk = max(dot_k_min(dtype), min(bk, k_lim))
        if (bm, bn, bk) in seen:
            continue
        seen.add((bm, bn, bk))
        tiles = -(-m_bucket // bm) * -(-n // bn) * _next_pow2(max(batch, 1))
        waves = -(-tiles // sm_count)
        efficiency = min(1.0, (bm * bn / (bm + bn)) / 64.0)
        cost = waves * bm * bn / efficiency
        ranked.append((cost, -bm * bn, len(ranked), {
            "BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": even_k(k, bk, k_cap),
            "num_warps": warps if bm * bn >= 64 * 64 else 4, "num_stages": stages}))
    ranked.sort(key=lambda r: r[:3])
    return [r[3] for r in ranked[:TUNE_CANDIDATES]]


def even_k(k: int, bk: int, k_cap: int = None) -> bool:
    """Whether K loads may go unmasked: no K step runs past its extent. A tap-major conv steps over
    ``k_cap`` channels per tap, so those must be a multiple of ``BLOCK_K`` too (48 channels x 2x2
    taps is K 192, a multiple of 64, yet each tap's 64-wide step would read 16 channels of the next
    pixel: a wrong result on the GPU's tuned tiles until 2026-12-07)."""
    return k % bk == 0 and (k_cap is None or k_cap % bk == 0)


def dot_k_min(dtype: DType) -> int:
    """The smallest ``BLOCK_K`` of a ``tl.dot`` of ``dtype`` operands on a GPU: 32 for 8-bit ones
    (int8, uint8, fp8: Triton asserts K >= 32 there; an int8 ResNet stem's K of 3 channels per tap
    failed to compile on an H100), 16 for the rest."""
    return 32 if dtype.itemsize == 1 else 16


def generic_tile_config(a_dtype: DType, k_cap: int = None, weight_nk: tuple = None, sm: int = 90) -> dict:
    """The configuration of the shape-generic fallback kernel on a GPU: moderate 64x64 tiles that
    suit any size, chosen without the sizes (``k_cap``, Conv's channels per tap, is the model's).
    ``weight_nk``: N and K of a product whose B is a weight (the same in every binding): fp16 / bf16
    tiles then take up to 128 columns and 64-deep K steps, unmasked where K allows (half the K
    steps of 64x64x32 over bert-base's K of 768; the fallback ran its steps 1.6-1.8x the
    specialized ones on an H100, 1.28-1.41x after): 24 KB of shared memory a stage, 3 stages (2
    below sm_80). A conv's (``k_cap`` its channels per tap) steps at most over those channels and
    goes unmasked only where they divide too (``even_k``); resnet50's fallback ran 1.39-1.58x its
    specialized steps with 64x64x32 (H100, 2026-12-07 run j; these tiles not yet timed there)."""
    bk = 16 if a_dtype is DType.FP64 else 32
    if k_cap is not None:
        bk = max(dot_k_min(a_dtype), min(bk, _next_pow2(k_cap)))
    bm = bn = 32 if a_dtype is DType.FP64 else 64
    if weight_nk is not None and a_dtype.itemsize <= 2:
        n, k = weight_nk
        bn = max(16, min(128, _next_pow2(n)))
        bk = max(dot_k_min(a_dtype), min(64, _next_pow2(min(k, k_cap or k))))
        return {"BLOCK_M": 64, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": even_k(k, bk, k_cap),
                "num_warps": 4, "num_stages": 3 if sm >= 80 else 2}
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8, "EVEN_K": False, "num_warps": 4,
            "num_stages": 3}


def tile_config(m: int, n: int, k: int, dtype: DType, interpret: bool) -> dict:
    """Block sizes (and warps) of the interpreter and of fp64: each a power of two, at least 16
    (the smallest ``tl.dot`` tile), no larger than the problem needs.

    Triton's interpreter runs each program in Python with numpy tiles, so there fewer, larger tiles
    are faster: a 256^3 fp32 MatMul took 7.1 s with 16^3 tiles, 230 ms with 64x64x32, 161 ms with
    128^3 and 24 ms with 256^3. fp64 multiplies in a 3-D tile (see ``product``), so its blocks stay
    small. GPU configurations of other dtypes come from ``tile_configs``.
    """
    if dtype is DType.FP64:
        caps = (32, 32, 16)
    else:
        caps = (256, 256, 256) if interpret else (64, 64, 32)
    blocks = [max(16, min(cap, _next_pow2(d))) for d, cap in zip((m, n, k), caps)]
    return {"BLOCK_M": blocks[0], "BLOCK_N": blocks[1], "BLOCK_K": blocks[2], "GROUP_M": 8,
            "EVEN_K": k % blocks[2] == 0, "num_warps": 4}


def tile_count(m: int, n: int, cfg: dict) -> int:
    """Programs along ``program_id(0)``: the ``[BLOCK_M, BLOCK_N]`` tiles that cover ``[m, n]``."""
    return -(-m // cfg["BLOCK_M"]) * -(-n // cfg["BLOCK_N"])


def split_programs(m: int, n: int, cfg: dict) -> int:
    """The tile count that split-K decisions (ops/matmul.py, ops/conv.py) weigh: over M rounded up
    to a power of two, as ``tile_configs`` ranks, so every M of a bucket decides alike. A split
    product is another kernel source, and the fallback kernels of a binding that crossed the
    decision inside a bucket were compiled in its first request (bert-base b4 on an H100: sequence
    96 and 80 after 128, 0.8-1 s each)."""
    return tile_count(_next_pow2(m), n, cfg)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p
