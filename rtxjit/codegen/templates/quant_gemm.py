"""Quantized products (rtxjit/quant/): a weight-only dequantizing GEMM and GEMV, and an int8 / fp8
tensor-core GEMM with the quantization scales in its epilogue.

Built from the pieces of ``templates/matmul.py`` (tile walk, K loop, ``tl.dot`` choice, bias
epilogue); only the tile loads and the epilogue's scaling are new here.

**Weight-only (``render_nbits``)**: ``out[M, N] = A[M, K] @ dequant(B)^T (+ bias)``, B packed as
onnxruntime's MatMulNBits stores it: ``[N, ceil(K / block), block * bits / 8]`` bytes, K innermost,
two 4-bit values per byte (the low nibble first), one scale (and zero point) per ``block`` values
of K. The packed bytes are what the kernel reads: a ``[BLOCK_N, BLOCK_K / 2]`` tile of bytes (16
contiguous bytes per row per access), split into nibbles with ``tl.interleave`` and dequantized
``(q - zero) * scale`` in fp32 in registers, so no dequantized weight exists in memory. Where a
K step lies inside one quantization block (``BLOCK_K <= block``, no ``g_idx``), the scale and zero
point are one ``[BLOCK_N]`` vector per step instead of a gather per element.
Two forms: the GEMM (``tl.dot`` on ``[BLOCK_M, BLOCK_N]`` tiles, for M > 16) and the GEMV for
decode shapes (M <= 16: all M rows in one ``[BLOCK_M, BLOCK_N]`` accumulator, the product summed
over a ``[BLOCK_M, BLOCK_N, BLOCK_K]`` register tile: no tensor-core padding of M to 16, and
every weight byte read once).
**Split-K** (the GEMV, ``split=True``): where ``N / BLOCK_N`` programs leave SMs idle (a decoder
MLP's down-projection, K 11008 x N 4096 at one token: 64 to 128 programs for 132 SMs), program
``(n, s)`` sums K range ``[s * k_per, (s + 1) * k_per)`` into an fp32 workspace ``[splits, M, N]``
and ``render_split_reduce`` adds the partials in split order (deterministic: no atomics), then the
bias and any fused epilogue.

**Quantized operands (``render_qdot``)**: ``a`` int8 / uint8 / fp8 (the quantized activation as
the graph's QuantizeLinear made it), ``b`` int8 / fp8 (a constant weight, its zero point already
subtracted at lowering). int8: ``tl.dot`` of int8 operands into an int32 accumulator (uint8
activations are shifted by -128 into int8, exactly; the shift and the activation's zero point come
back as ``corr[n] = (128 - za) * colsum(b)[n]``, an int32 vector made at lowering); fp8: ``tl.dot``
of fp8 operands into fp32. Then ``y = acc * cs[n] (+ bias)``, ``cs[n] = sa * sb[n]`` (per-tensor or
per-channel), and where the graph quantizes the result, ``y`` is quantized in the epilogue with
the QuantizeLinear arithmetic of ``templates/quant.py`` (the same integers as the pointwise op).

The interpreter has no correct fp8 conversion for NaN / inf (see templates/quant.py), so under it
(``interpret=True``) the fp8 operands are decoded from their bits to fp32 and multiplied with an
fp32 ``tl.dot`` (fp8 products are exact in fp32): the same values, other instructions. The GPU
source keeps the fp8 ``tl.dot`` (tests check the source text).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.matmul import (_next_pow2, epilogue, int64_suffix, masked_load, product, signature,
                                             tile_configs, tile_indices)
from rtxjit.codegen.templates.quant import decode_fp8, divide, encode_fp8, quantize_int
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

FP8 = (DType.FP8E4M3, DType.FP8E5M2)
GEMV_ROW_LOOP = 4  # the 4-bit GEMV takes up to this many rows one by one; more (to 16) by tensor-core dots
ZERO_KINDS = ("none", "packed", "float")


# ---- weight-only ----------------------------------------------------------------------------------

def dequant_lines(bits: int, block: int, zero: str, g_idx: bool) -> list:
    """Loop-body lines (8-space indent) defining ``w``, the ``[BLOCK_N, BLOCK_K]`` fp32 weight tile
    of rows ``rn`` at K indices ``rk`` (``k0`` the step's first), read from the packed bytes.
    Masked-off bytes read 0 (a finite weight: the matching ``a`` values are 0)."""
    kmask = "(rk[None, :] < K)"
    if bits == 4:
        lines = ["        rkb = k0 // 2 + tl.arange(0, BLOCK_K // 2)",
                 "        q_b = tl.load(b_ptr + b_off + rn[:, None] * ldb + rkb[None, :], "
                 "mask=(rn[:, None] < N) & (rkb[None, :] * 2 < K), other=0).to(tl.int32)",
                 "        q = tl.interleave(q_b & 15, q_b >> 4).to(tl.float32)"]
    else:
        lines = ["        q = tl.load(b_ptr + b_off + rn[:, None] * ldb + rk[None, :], "
                 f"mask=(rn[:, None] < N) & {kmask}, other=0).to(tl.float32)"]
    if g_idx:
        lines += ["        q_g = tl.load(g_ptr + g_off + rk, mask=rk < K, other=0)[None, :]",
                  f"        q_m = (rn[:, None] < N) & {kmask}"]
        lines += _scale_zero_lines(bits, zero, "        ")
        lines.append("        w = (q - q_zv) * q_s")
        return lines
    # BLOCK_K <= block: one quantization block per step (both powers of two, k0 a multiple of
    # BLOCK_K); else BLOCK_K // block whole blocks, their scales (and zero points) loaded once per
    # block and broadcast over it through a [BLOCK_N, blocks, block] view of the tile, not gathered
    # per weight (a [BLOCK_N, BLOCK_K] gather of scales read 4 bytes per 4-bit weight)
    lines += [f"        if BLOCK_K <= {block}:",
              f"            q_g = k0 // {block} + tl.zeros((1, 1), dtype=tl.int32)",
              "            q_m = rn[:, None] < N",
              *_scale_zero_lines(bits, zero, "            "),
              "            w = (q - q_zv) * q_s",
              "        else:",
              f"            q_g = (k0 // {block} + tl.arange(0, BLOCK_K // {block}))[None, :]",
              f"            q_m = (rn[:, None] < N) & (q_g * {block} < K)",
              *_scale_zero_lines(bits, zero, "            "),
              f"            q_3 = tl.reshape(q, (BLOCK_N, BLOCK_K // {block}, {block}))",
              f"            w = tl.reshape((q_3 - q_zv[:, :, None]) * q_s[:, :, None], (BLOCK_N, BLOCK_K))"]
    return lines


def gemv4_lines(block: int, zero: str, wide: bool, a_dtype: DType = DType.FP32) -> list:
    """The 4-bit GEMV's K step (no ``g_idx``): ``BLOCK_K // SB`` sub-steps (unrolled; their loads
    independent) of ``SB = min(BLOCK_K, block)`` values each, inside one quantization block, so one
    scale and zero point per row per sub-step. The packed bytes stay bytes, ``[BLOCK_N, SB / 2]``
    (a row's bytes in one thread: one vector load, a sum without shuffles): the low nibbles multiply
    the even activations and the high ones the odd (``a``'s row loaded whole, the same in every
    thread, and split into even and odd), no interleave or 3-D tile;
    ``sum((q - z) a) = sum(q a) - z sum(a)``, scaled once per row. Rows of ``a`` one by one
    (``BLOCK_M <= 4``), the last row read again for padding rows;
    with ``BLOCK_M >= 16`` (5 to 16 rows, ``SB >= 32``) all rows at once by two dots of
    ``[BLOCK_M, SB / 2]`` activations and the nibbles (0..15, exact in ``a``'s dtype): tensor cores
    for fp16 / bf16, fp32 accumulation; fp32 in IEEE mode (as the matmul template's)."""
    w = int64_suffix(wide)
    sb = f"min(BLOCK_K, {block})"
    scale = [line.replace("rn[:, None]", "rn") for line in _scale_zero_lines(4, zero, "            ")]
    return [f"        for u in tl.static_range(0, BLOCK_K // {sb}):",
            f"            kk = k0 + u * {sb}",
            f"            rkb = kk // 2 + tl.arange(0, {sb} // 2){w}",
            "            q_addr = b_ptr + b_off + rn[:, None] * ldb + rkb[None, :]",
            "            if EVEN_K:  # no K tail: the loads keep only their row masks (and vectorize)",
            "                q_b = tl.load(q_addr, mask=rn[:, None] < N, other=0)",
            "            else:",
            "                q_b = tl.load(q_addr, mask=(rn[:, None] < N) & (rkb[None, :] * 2 < K), other=0)",
            "            q_b = q_b.to(tl.int32)",
            "            q_lo = (q_b & 15).to(tl.float32)",
            "            q_hi = (q_b >> 4).to(tl.float32)",
            f"            q_g = kk // {block} + tl.zeros((1,), dtype=tl.int32)",
            f"            q_m = (rn < N) & (q_g * {block} < K)",
            *scale,
            *_gemv4_dot_lines(sb, w, a_dtype),
            "                for mi in tl.static_range(0, BLOCK_M):",
            f"                    rka = kk + tl.arange(0, {sb}){w}",
            "                    ra = a_ptr + a_off + tl.minimum(mi, M - 1) * a_sm + rka",
            "                    if EVEN_K:",
            "                        a_k = tl.load(ra).to(tl.float32)",
            "                    else:",
            "                        a_k = tl.load(ra, mask=rka < K, other=0.0).to(tl.float32)",
            f"                    a_e, a_o = tl.split(tl.reshape(a_k, ({sb} // 2, 2)))",
            "                    dot = tl.sum(q_lo * a_e[None, :] + q_hi * a_o[None, :], axis=1)",
            "                    part = (dot - q_zv * (tl.sum(a_e, axis=0) + tl.sum(a_o, axis=0))) * q_s",
            "                    acc += tl.where(rm[:, None] == mi, part[None, :], 0.0)"]


def _gemv4_dot_lines(sb: str, w: str, a_dtype: DType) -> list:
    """``gemv4_lines``' tensor-core form (``BLOCK_M >= 16``), then the opening of the row loop's
    branch."""
    t = TL[a_dtype]
    ieee = ', input_precision="ieee"' if a_dtype is DType.FP32 else ""  # as the matmul template's fp32 dots
    return ["            if BLOCK_M >= 16:",
            f"                rka = kk + tl.arange(0, {sb}){w}",
            "                ra = a_ptr + a_off + rm[:, None] * a_sm + rka[None, :]",
            "                if EVEN_K:",
            "                    a_k = tl.load(ra, mask=rm[:, None] < M, other=0.0)",
            "                else:",
            "                    a_k = tl.load(ra, mask=(rm[:, None] < M) & (rka[None, :] < K), other=0.0)",
            f"                a_e, a_o = tl.split(tl.reshape(a_k, (BLOCK_M, {sb} // 2, 2)))",
            f"                dot = tl.dot(a_e, tl.trans(q_lo.to({t})){ieee})",
            f"                dot = tl.dot(a_o, tl.trans(q_hi.to({t})), dot{ieee})",
            "                a_sum = tl.sum(a_e.to(tl.float32), axis=1) + tl.sum(a_o.to(tl.float32), axis=1)",
            "                acc += (dot - q_zv[None, :] * a_sum[:, None]) * q_s[None, :]",
            "            else:"]


def _scale_zero_lines(bits: int, zero: str, indent: str) -> list:
    """Lines loading ``q_s`` (scales) and ``q_zv`` (zero points, or the constant midpoint) of the
    blocks ``q_g`` of rows ``rn`` under ``q_m``, at ``indent``."""
    lines = ["q_s = tl.load(s_ptr + s_off + rn[:, None] * lds + q_g, mask=q_m, other=0.0).to(tl.float32)"]
    if zero == "none":
        lines.append(f"q_zv = tl.zeros_like(q_s) + {float(1 << (bits - 1))}")
    elif zero == "float":
        lines.append("q_zv = tl.load(z_ptr + z_off + rn[:, None] * lds + q_g, mask=q_m, other=0.0).to(tl.float32)")
    elif bits == 4:
        lines += ["q_zb = tl.load(z_ptr + z_off + rn[:, None] * ldz + q_g // 2, mask=q_m, other=0).to(tl.int32)",
                  "q_zv = ((q_zb >> ((q_g % 2) * 4)) & 15).to(tl.float32)"]
    else:
        lines.append("q_zv = tl.load(z_ptr + z_off + rn[:, None] * ldz + q_g, mask=q_m, other=0).to(tl.float32)")
    return [indent + line for line in lines]


def render_nbits(a_dtype: DType, bits: int, block: int, zero: str, g_idx: bool, has_bias: bool, gemv: bool,
                 wide: bool = False, fused=None, split: bool = False) -> KernelSource:
    """``out[M, N] = a[M, K] @ dequant(b)^T (+ bias)``: see the module docstring.

    Arguments: ``out, a, b, s`` (scales) and, where present, ``z`` (zero points), ``g``
    (``g_idx`` as int32 block indices), ``bias`` (a ``[M, N]`` broadcast view), each as pointer
    and offset; ``M, N, K``; ``out_sm, a_sm`` (rows are contiguous), ``ldb`` (bytes per weight
    row), ``lds`` (scales per row), ``ldz`` (packed zero-point bytes per row, packed only), then
    ``bias_sm, bias_sn``, then a ``fused`` epilogue's extras (pointer, offset, row and column
    strides) and scalars (templates/epilogue.py). Constexprs as the matmul template's (``GROUP_M``,
    ``EVEN_K`` unused by the GEMV).

    ``split`` (GEMV only, no bias or fused epilogue: ``render_split_reduce`` applies them): program
    ``(n, s)`` covers K from ``s * k_per`` (a multiple of ``BLOCK_K``) and stores its fp32 partial
    sums at ``out + s * out_ss``; arguments ``k_per, out_ss`` follow ``ldz``."""
    if split and (not gemv or has_bias or fused is not None):
        raise InternalError("qgemv: a split-K GEMV stores fp32 partial sums (no bias or fused epilogue)")
    if zero not in ZERO_KINDS:
        raise InternalError(f"qmatmul: zero point kind {zero!r} (one of {ZERO_KINDS})")
    params = ["out_ptr", "out_off", "a_ptr", "a_off", "b_ptr", "b_off", "s_ptr", "s_off"]
    params += ["z_ptr", "z_off"] if zero != "none" else []
    params += ["g_ptr", "g_off"] if g_idx else []
    params += ["bias_ptr", "bias_off"] if has_bias else []
    params += ["M", "N", "K", "out_sm", "a_sm", "ldb", "lds"]
    params += ["ldz"] if zero == "packed" else []
    params += ["k_per", "out_ss"] if split else []
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += fused.params(["sm", "sn"]) if fused else []
    w = int64_suffix(wide)
    a_addr = "a_ptr + a_off + rm[:, None] * a_sm + rk[None, :]"
    k_range = "0, K, BLOCK_K"
    if gemv:
        head = ["    pid = tl.program_id(0)", f"    rm = tl.arange(0, BLOCK_M){w}",
                f"    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N){w}"]
        if split:
            head += [f"    pid_k = tl.program_id(1){w}", "    out_off = out_off + pid_k * out_ss",
                     "    k_lo = pid_k * k_per"]
            k_range = "k_lo, tl.minimum(k_lo + k_per, K), BLOCK_K"
        step = ["        a = tl.load(" + a_addr + ", mask=(rm[:, None] < M) & (rk[None, :] < K), other=0.0)"
                ".to(tl.float32)",
                "        acc += tl.sum(a[:, None, :] * w[None, :, :], axis=2)"]
    else:
        head = tile_indices(wide)
        step = [*masked_load("a", a_addr, "(rm[:, None] < M)", "(rk[None, :] < K)"),
                f"        b = tl.trans(w.to({TL[a_dtype]}))",
                f"        acc = {product(a_dtype)}"]
    if gemv and bits == 4 and not g_idx:
        body = gemv4_lines(block, zero, wide, a_dtype)
    else:
        body = [f"        rk = k0 + tl.arange(0, BLOCK_K){w}", *dequant_lines(bits, block, zero, g_idx), *step]
    lines = [
        signature("qgemv" if gemv else "qmatmul", params),
        *head,
        "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        f"    for k0 in range({k_range}):",
        *body,
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        *epilogue("out_ptr + out_off + rm[:, None] * out_sm + rn[None, :]", DType.FP32 if split else a_dtype,
                  has_bias, False, fused=fused, fused_addr=_extra_addr),
    ]
    header = (f"{'qgemv' if gemv else 'qmatmul'} in={a_dtype.short} bits={bits} block={block} zero={zero} "
              f"g_idx={g_idx} bias={has_bias}") + (fused.header() if fused else "") + (" split_k" if split else "")
    return render("qgemv" if gemv else "qmatmul", header, "\n".join(lines))


def render_split_reduce(out_dtype: DType, has_bias: bool, wide: bool = False, fused=None) -> KernelSource:
    """``out[M, N] = sum over s of ws[s, M, N] (+ bias)`` then a ``fused`` epilogue: the second
    kernel of a split-K GEMV, adding the partials in split order (the same bits on every run).

    Arguments: ``out, ws`` (and ``bias``) as pointer and offset; ``M, N, splits``; ``out_sm``
    (``ws`` is contiguous ``[splits, M, N]``); ``bias_sm, bias_sn``; then the fused epilogue's
    extras and scalars. Constexprs ``BLOCK_M`` (all rows), ``BLOCK_N``; grid ``cdiv(N, BLOCK_N)``."""
    params = ["out_ptr", "out_off", "ws_ptr", "ws_off"] + (["bias_ptr", "bias_off"] if has_bias else [])
    params += ["M", "N", "splits", "out_sm"] + (["bias_sm", "bias_sn"] if has_bias else [])
    params += fused.params(["sm", "sn"]) if fused else []
    w = int64_suffix(wide)
    text = ", ".join(params + ["BLOCK_M: tl.constexpr", "BLOCK_N: tl.constexpr"]) + "):"
    lines = [
        textwrap.fill(text, width=100, initial_indent="def qsplit_reduce(", subsequent_indent=" " * 17,
                      break_long_words=False, break_on_hyphens=False),
        f"    rm = tl.arange(0, BLOCK_M){w}",
        f"    rn = tl.program_id(0){w} * BLOCK_N + tl.arange(0, BLOCK_N){w}",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)",
        "    for s in range(0, splits):",
        "        acc += tl.load(ws_ptr + ws_off + (s * M + rm[:, None]) * N + rn[None, :], mask=mask, other=0.0)",
        *epilogue("out_ptr + out_off + rm[:, None] * out_sm + rn[None, :]", out_dtype, has_bias, False, fused=fused,
                  fused_addr=_extra_addr),
    ]
    header = f"qsplit_reduce out={out_dtype.short} bias={has_bias}" + (fused.header() if fused else "")
    return render("qsplit_reduce", header, "\n".join(lines))


# A split-K GEMV aims at this many programs per SM (memory-bound: bytes in flight), each split
# covering at least SPLIT_MIN_STEPS steps of the largest BLOCK_K among the candidate configurations.
SPLIT_PROGRAMS_PER_SM = 4
SPLIT_MIN_STEPS = 2


def split_k(n: int, k: int, cfgs: list, sm_count: int) -> tuple:
    """``(splits, k_per)`` for a GEMV over ``cfgs`` (one K chunk for all of them: ``k_per`` is a
    multiple of every ``BLOCK_K``): ``(1, k)`` where the first configuration's ``cdiv(N, BLOCK_N)``
    programs already fill ``sm_count`` SMs or K is too short to split."""
    step = max(c["BLOCK_K"] for c in cfgs)
    programs = -(-n // cfgs[0]["BLOCK_N"])
    most = k // (step * SPLIT_MIN_STEPS)
    if programs >= sm_count or most < 2:
        return 1, k
    splits = min(-(-SPLIT_PROGRAMS_PER_SM * sm_count // programs), most)
    k_per = -(-(-(-k // splits)) // step) * step
    return -(-k // k_per), k_per


def _extra_addr(k: int) -> str:
    """A fused epilogue's extra input ``k`` at the ``[rm, rn]`` tile (templates/epilogue.py)."""
    return f"e{k}_ptr + e{k}_off + rm[:, None] * e{k}_sm + rn[None, :] * e{k}_sn"


def nbits_configs(m: int, n: int, k: int, gemv: bool, interpret: bool, dtype: DType, sm: int, sm_count: int,
                  block4: int = 0) -> list:
    """Candidate configurations, best guess first. The GEMV keeps ``BLOCK_M * BLOCK_N * BLOCK_K``
    (its register tile) at 8K elements for 4 warps; the GEMM takes the matmul template's.
    ``block4``: the quantization block of the 4-bit GEMV (``gemv4_lines``), whose register tile is
    one sub-step's ``BLOCK_M * BLOCK_N * min(BLOCK_K, block) / 2`` bytes, kept at 2K to 4K, and
    whose ``BLOCK_K`` (a multiple of the sub-step) sets how many sub-steps are unrolled."""
    if gemv and block4 and not interpret:
        bm = 16 if m > GEMV_ROW_LOOP else _next_pow2(m)  # the tensor-core form from 5 rows on
        sub = min(block4, 256)
        out = []
        for unroll, budget in ((2, 2048), (4, 2048), (1, 4096), (2, 4096)):
            rows = 1 if bm >= 16 else bm  # the row loop's weight tile is reused row by row
            bn = max(16, min(256, budget // (rows * max(1, sub // 2)), _next_pow2(n)))
            bk = sub * unroll
            if bk > max(sub, _next_pow2(k)):
                continue
            cfg = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "EVEN_K": k % bk == 0,
                   "num_warps": 4, "num_stages": 1}
            if cfg not in out:
                out.append(cfg)
        return out
    if gemv:
        bm = _next_pow2(m)
        if interpret:
            return [{"BLOCK_M": bm, "BLOCK_N": max(16, min(64, _next_pow2(n))), "BLOCK_K": max(16, min(128, _next_pow2(k))),
                     "GROUP_M": 1, "EVEN_K": False, "num_warps": 4}]
        out = []
        for bk in (256, 128, 64, 32):
            bn = max(8, 8192 // (bm * bk))
            bn = min(bn, max(8, _next_pow2(n)))
            if bk > max(32, _next_pow2(k)):
                continue
            out.append({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 1, "EVEN_K": k % bk == 0,
                        "num_warps": 4, "num_stages": 3})
        return out[:4]
    return [min_block_k(c, k, interpret) for c in tile_configs(m, n, k, dtype, interpret, sm=sm, sm_count=sm_count)]


def min_block_k(cfg: dict, k: int, interpret: bool) -> dict:
    """``cfg`` with ``BLOCK_K`` at least 32 on a GPU (the K of an int8 / fp8 tensor-core
    instruction), ``EVEN_K`` recomputed for it."""
    if interpret or cfg["BLOCK_K"] >= 32:
        return cfg
    return dict(cfg, BLOCK_K=32, EVEN_K=k % 32 == 0)


def gemv_grid(n: int, cfg: dict) -> tuple:
    return (-(-n // cfg["BLOCK_N"]),)


# ---- int8 / fp8 operands ------------------------------------------------------------------------

def _fp8_operand(name: str, dtype: DType, interpret: bool) -> list:
    """Lines turning ``name`` (loaded as uint8 bits) into the dot's operand."""
    if interpret:  # exact decode (the interpreter's fp8 conversions are wrong on NaN / inf)
        return [f"        {line}" for line in decode_fp8(name, dtype, f"{name}_f")] + [f"        {name} = {name}_f"]
    return [f"        {name} = {name}.to({TL[dtype]}, bitcast=True)"]


def int8_operand(a_dtype: DType) -> list:
    """Loop-body lines that make the loaded activation tile ``a`` an int8 operand: uint8 values are
    shifted by -128 (exactly; the lowering's per-column correction adds ``128 * colsum(b)`` back)."""
    return ["        a = (a.to(tl.int32) - 128).to(tl.int8)"] if a_dtype is DType.UINT8 else []


def scaled_epilogue(out_addr: str, out_dtype: DType, has_corr: bool, has_bias: bool, saturate: bool = True,
                    cols: str = "rn", relu: bool = False, stages: tuple = (), res_addr: str = None,
                    fused=None) -> list:
    """From the integer (or fp8 product) accumulator ``acc`` to the stored output: ``acc + corr[n]``
    (the zero points' correction), times ``cs[n]`` in fp32, plus the float bias, ``relu``, then
    where ``out_dtype`` is quantized the QuantizeLinear arithmetic of ``templates/quant.py``
    (``y / y_scale`` correctly rounded, round half to even, ``+ y_zero``, saturate).

    ``stages`` (each ``(add, relu)``, int8 / uint8 outputs): what the graph does after that
    QuantizeLinear, each stage ``DQ -> [Add(., DQ(res))] [-> Relu] -> Q`` in the same fp32
    operations as its pointwise kernels: ``(q - zero) * scale`` with the previous quantization's
    parameters, ``+ (res - res_zero) * res_scale`` (the tile at ``res_addr``), ``max(., 0)``, then
    quantized with ``s{k}_scale, s{k}_zero`` (k = 1, 2, ...). ``cols`` indexes the per-column vectors
    (``co`` in a grouped conv), masked by ``rn < N``. A ``fused`` epilogue (a pointwise program of
    rtxjit.Epilogue, templates/epilogue.py; float outputs without ``relu`` only) runs after the bias,
    its extras addressed at the ``[rm, rn]`` tile."""
    lines = []
    if has_corr:
        lines.append(f"    acc = acc + tl.load(corr_ptr + corr_off + {cols}, mask=rn < N, other=0)[None, :]")
    lines.append(f"    acc = acc.to(tl.float32) * tl.load(cs_ptr + cs_off + {cols}, mask=rn < N, other=0.0)[None, :]")
    if out_dtype.is_float and out_dtype not in FP8 and not relu:
        return lines + epilogue(out_addr, out_dtype, has_bias, False, cols=cols, fused=fused, fused_addr=_extra_addr)
    if fused is not None:
        raise InternalError(f"a fused epilogue after a quantized product of {out_dtype.short} (relu={relu})")
    lines += epilogue(out_addr, DType.FP32, has_bias, False, cols=cols)[:-1]  # all but the store
    if relu:
        lines.append("    y = tl.maximum(y, 0.0)")
    if out_dtype.is_float and out_dtype not in FP8:
        return lines + [f"    tl.store({out_addr}, y.to({TL[out_dtype]}), mask=mask)"]
    lines.append(f"    q_v = {divide('y', 'y_scale')}")
    if out_dtype in FP8:
        lines += [f"    {s}" for s in encode_fp8("q_v", out_dtype, saturate, "q_y")]
    else:
        lines += [f"    {s}" for s in quantize_int("q_v", "y_zero", out_dtype, "q_y")]
    prev = "y"
    for k, (add, stage_relu) in enumerate(stages, start=1):
        lines.append(f"    # stage {k}: DQ{' + DQ(res)' if add else ''}{' -> Relu' if stage_relu else ''} -> Q")
        lines.append(f"    y = (q_y - {prev}_zero) * {prev}_scale")
        if add:
            lines += [f"    res = tl.load({res_addr}, mask=mask, other=0).to(tl.float32)",
                      "    y = y + (res - res_zero) * res_scale"]
        lines += ["    y = tl.maximum(y, 0.0)"] if stage_relu else []
        prev = f"s{k}"
        lines.append(f"    q_v = {divide('y', f'{prev}_scale')}")
        lines += [f"    {s}" for s in quantize_int("q_v", f"{prev}_zero", out_dtype, "q_y")]
    lines.append(f"    tl.store({out_addr}, q_y.to({TL[out_dtype]}), mask=mask)")
    return lines


def render_qdot(a_dtype: DType, b_dtype: DType, out_dtype: DType, has_corr: bool, has_bias: bool,
                interpret: bool, saturate: bool = True, wide: bool = False, fused=None,
                quantize_a: bool = None) -> KernelSource:
    """``out = requant?(acc * cs[n] (+ bias))``, ``acc = a @ b`` in int32 (int8 operands) or fp32
    (fp8 operands): see the module docstring.

    Arguments: ``out, a, b, cs`` (and ``corr``, ``bias``) as pointer and offset; ``y_scale,
    y_zero`` (floats; used where ``out_dtype`` is quantized); ``M, N, K``; ``out_sm, out_sn, a_sm,
    a_sk, b_sk, b_sn`` (and ``bias_sm, bias_sn``), then a ``fused`` epilogue's extras and scalars
    (float outputs: see ``scaled_epilogue``). uint8 ``a`` is shifted into int8 in the kernel;
    ``b`` is int8 or fp8 bits; fp8 operands come as their uint8 bits. ``saturate`` is the fp8
    QuantizeLinear's. ``quantize_a`` (not None; for fp8 the activation QuantizeLinear's
    ``saturate``): ``a`` is the float activation, quantized as it is loaded (``a / a_qs`` rounded
    to fp8, or rounded and shifted by the zero point ``a_qz`` into int8 / uint8, with
    QuantizeLinear's arithmetic: the same codes as the unfused op), scalars ``a_qs`` (and ``a_qz``)
    before ``y_scale``: no QuantizeLinear kernel writes the 8-bit activation for the product to read."""
    fp8 = a_dtype in FP8
    params = ["out_ptr", "out_off", "a_ptr", "a_off", "b_ptr", "b_off", "cs_ptr", "cs_off"]
    params += ["corr_ptr", "corr_off"] if has_corr else []
    params += ["bias_ptr", "bias_off"] if has_bias else []
    params += ([] if quantize_a is None else ["a_qs"] if fp8 else ["a_qs", "a_qz"])
    params += ["y_scale", "y_zero", "M", "N", "K", "out_sm", "out_sn", "a_sm", "a_sk", "b_sk", "b_sn"]
    params += ["bias_sm", "bias_sn"] if has_bias else []
    params += fused.params(["sm", "sn"]) if fused else []
    a_addr = "a_ptr + a_off + rm[:, None] * a_sm + rk[None, :] * a_sk"
    b_addr = "b_ptr + b_off + rk[:, None] * b_sk + rn[None, :] * b_sn"
    loads = [*masked_load("a", a_addr, "(rm[:, None] < M)", "(rk[None, :] < K)"),
             *masked_load("b", b_addr, "(rn[None, :] < N)", "(rk[:, None] < K)")]
    if fp8:
        hardware = quantize_a and not interpret
        if hardware:  # saturating: the GPU's conversion (cvt.rn.satfinite) rounds and saturates as
            # QuantizeLinear does (templates/quant.py); the integer encoding below took ~20 operations
            # an element in the K loop (fp8 bert-base b8 ran 0.13x of fp16 on an H100 with it)
            loads += ["        a = " + divide("a.to(tl.float32)", "a_qs") + f".to({TL[a_dtype]})"]
        elif quantize_a is not None:  # QuantizeLinear's encoding (templates/quant.py), kept as bits
            encode = encode_fp8("a_v", a_dtype, quantize_a, "a_q")[:-1]
            loads += ["        a_v = " + divide("a.to(tl.float32)", "a_qs"), *(f"        {line}" for line in encode),
                      "        a = (a_q_c | a_q_s).to(tl.uint8)"]
        loads += ([] if hardware else _fp8_operand("a", a_dtype, interpret)) + _fp8_operand("b", b_dtype, interpret)
        dot = 'tl.dot(a, b, acc, input_precision="ieee")' if interpret else "tl.dot(a, b, acc)"
        acc = "tl.float32"
    else:
        if quantize_a is not None:  # QuantizeLinear's rounding and range (templates/quant.py)
            loads += ["        a_v = " + divide("a.to(tl.float32)", "a_qs"),
                      *(f"        {line}" for line in quantize_int("a_v", "a_qz", a_dtype, "a_q")),
                      f"        a = a_q.to(tl.int32).to({TL[a_dtype]})"]
        loads += int8_operand(a_dtype)
        dot, acc = "tl.dot(a, b, acc, out_dtype=tl.int32)", "tl.int32"  # triton 3.6 asserts acc is out_dtype
    lines = [
        signature("qdot", params),
        *tile_indices(wide),
        f"    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype={acc})",
        "    for k0 in range(0, K, BLOCK_K):",
        f"        rk = k0 + tl.arange(0, BLOCK_K){int64_suffix(wide)}",
        *loads,
        f"        acc = {dot}",
        "    mask = (rm[:, None] < M) & (rn[None, :] < N)",
        "    # scales: acc is sum (a - za)(b - zb) in integers (int8) or the fp8 product",
        *scaled_epilogue("out_ptr + out_off + rm[:, None] * out_sm + rn[None, :] * out_sn", out_dtype, has_corr,
                         has_bias, saturate, fused=fused),
    ]
    header = (f"qdot a={a_dtype.short} b={b_dtype.short} out={out_dtype.short} corr={has_corr} bias={has_bias}"
              f"{'' if saturate else ' saturate=0'}{' interpret' if interpret and fp8 else ''}"
              f"{'' if quantize_a is None else f' quantize_a saturate={int(quantize_a)}'}")
    header += fused.header() if fused else ""
    return render("qdot", header, "\n".join(lines))



# ---- the conv template's ``quant`` option ------------------------------------------------------------

@dataclass(frozen=True)
class QuantConv:
    """What ``render_conv2d(quant=...)`` (templates/conv.py) needs to run an int8 x int8 -> int32
    implicit GEMM (rtxjit.QLinearConv, rtxjit/quant/qlinear.py): the activation's type (uint8 is
    shifted into int8 in the loop), the output's (a float, or int8 / uint8 requantized in the
    epilogue), whether a per-channel int32 correction is added, a Relu before the quantization, and
    the stages after it (a residual of ``res_dtype`` added in one), as ``scaled_epilogue`` describes.

    Taps that fall into the padding must contribute ``(za - za) * w = 0``: the activation tile is
    loaded with ``other=a_pad`` (the activation's zero point) instead of 0, and the correction
    ``(shift - za) * colsum(w)`` over all K then cancels it exactly."""

    a_dtype: DType
    out_dtype: DType
    has_corr: bool
    relu: bool = False
    stages: tuple = ()  # ((add, relu), ...): see scaled_epilogue
    res_dtype: DType = None

    def params(self, axes: str) -> list:
        """``cs`` (and ``corr``) as pointer and offset, ``a_pad, y_scale, y_zero``; with a residual
        its pointer, offset, N C (D) H W strides, ``res_scale, res_zero``; ``s{k}_scale, s{k}_zero``
        per stage."""
        out = ["cs_ptr", "cs_off"] + (["corr_ptr", "corr_off"] if self.has_corr else []) + ["a_pad", "y_scale", "y_zero"]
        if any(add for add, _ in self.stages):
            out += ["res_ptr", "res_off", *(f"res_s{a}" for a in "nc" + axes), "res_scale", "res_zero"]
        for k in range(1, len(self.stages) + 1):
            out += [f"s{k}_scale", f"s{k}_zero"]
        return out

    def epilogue(self, out_addr: str, has_bias: bool, res_addr: str) -> list:
        return scaled_epilogue(out_addr, self.out_dtype, self.has_corr, has_bias, cols="co", relu=self.relu,
                               stages=self.stages, res_addr=res_addr)

    def header(self) -> str:
        text = f" quant={self.a_dtype.short}->{self.out_dtype.short} corr={self.has_corr}"
        text += " relu" if self.relu else ""
        for add, relu in self.stages:
            text += f" stage={'add' if add else ''}{'+' if add and relu else ''}{'relu' if relu else ''}"
        text += f" residual={self.res_dtype.short}" if self.res_dtype is not None else ""
        return text
