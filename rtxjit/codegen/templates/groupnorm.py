"""Group normalization: mean and variance over each (sample, group) of a contiguous ``[N, C, *S]``
tensor, then a per-channel affine and an optional fused pointwise program, in one store.

A *row* is one (n, g): the ``C/G * prod(S)`` elements of channels ``g*C/G .. (g+1)*C/G - 1`` of
sample n, contiguous in memory; ``row = n * G + g`` starts at ``row * n_cols``. Channel of a
column: ``(row % G) * C/G + col // spatial``. InstanceNormalization is the case G = C.

Two forms (the lowering in rtxjit/ops/norm.py picks one):

* one pass per row (``split=False``): each program owns ``BLOCK_R`` whole rows (short rows pack,
  as in the row-reduction template); a row that fits one block (``ONE_BLOCK``) is loaded once and
  normalized from registers, a longer one is walked twice (Chan's combination of per-block mean
  and M2, then the store).
* split (``split=True``), for few long rows (diffusion UNets: 64 rows of 40960 elements at 64x64
  latents, where one program per row would leave most of the GPU idle and walk 40k elements
  serially): ``group_norm_stats`` writes each row part's (mean, M2) to a small ``[rows, parts, 2]``
  buffer, grid (rows, parts); ``group_norm`` then runs on the same grid, each program combining
  its row's part statistics (Chan's formula over the parts, vectorized) and normalizing its part.

Statistics accumulate in ``acc`` (fp32 for fp16/bf16/fp32 data, or what stash_type says). The
fused program (the ``EPILOGUE`` hook, see templates/epilogue.py) sees the normalized, scaled and
shifted value as its input 0 ``y`` in the compute type; its extra inputs ``e{k}`` are loaded at the
element's (n, c, s) through three strides each (a per-channel or full-size operand, a scalar).
"""

from __future__ import annotations

from typing import Optional

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.epilogue import FusedEpilogue
from rtxjit.ir.types import DType

EXTRA_STRIDES = ("sn", "sc", "ss")  # per extra input: strides of sample, channel and spatial index


def _indent(lines: list, depth: int) -> list:
    return [" " * (4 * depth) + line for line in lines]


def _chan_update(acc: str, seen: str) -> list:
    """Chan's parallel update of (mean, m2) by the loaded block ``x`` (masked by ``mask``, its valid
    columns ending at ``limit``), after ``seen`` elements."""
    return [f"n_b = tl.minimum(limit - c0, BLOCK_C).to({acc})",
            "b_mean = tl.sum(x, 1, keep_dims=True) / n_b",
            "d = tl.where(mask, x - b_mean, 0.0)",
            f"total = {seen} + n_b",
            "delta = b_mean - mean",
            "mean = mean + delta * (n_b / total)",
            f"m2 = m2 + tl.sum(d * d, 1, keep_dims=True) + delta * delta * ({seen} * n_b / total)"]


def _load(acc: str, limit: str, start: str) -> list:
    cols = "cols0" if start == "0" else f"{start} + cols0"
    return [f"cols = {cols}",
            f"mask = row_mask & (cols < {limit})",
            f"x = tl.load(x_ptr + x_off + row_off + cols, mask=mask, other=0).to({acc})"]


def _normalize_store(acc: str, out: DType, fused: Optional[FusedEpilogue]) -> list:
    lines = ["ch = ch0 + cols // spatial",
             f"w = tl.load(w_ptr + w_off + ch * w_st, mask=mask, other=0).to({acc})",
             f"b = tl.load(b_ptr + b_off + ch * b_st, mask=mask, other=0).to({acc})",
             "y = (x - mean) * rstd * w + b"]
    if fused is not None:
        def address(k: int) -> str:
            return f"e{k}_ptr + e{k}_off + n_idx * e{k}_sn + ch * e{k}_sc + (cols % spatial) * e{k}_ss"

        lines += [line[4:] for line in fused.lines(address)]  # lines() indents by one level
    lines.append(f"tl.store(y_ptr + y_off + row_off + cols, y.to({TL[out]}), mask=mask)")
    return lines


def render_group_norm(in_dtype: DType, out_dtype: DType, acc_dtype: DType, *, split: bool,
                      fused: Optional[FusedEpilogue] = None, wide: bool = False) -> KernelSource:
    """The normalizing kernel (see the module docstring); ``split`` reads part statistics written
    by ``render_group_norm_stats``'s kernel instead of computing its rows' own."""
    acc = TL[acc_dtype]
    params = ["x_ptr", "x_off", "y_ptr", "y_off", "w_ptr", "w_off", "w_st", "b_ptr", "b_off", "b_st"]
    params += ["p_ptr", "p_off"] if split else []
    params += fused.params(list(EXTRA_STRIDES)) if fused is not None else []
    params += ["n_rows", "n_cols", "n_groups", "group_channels", "spatial", "chunk", "n_parts", "eps",
               "BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr", "ONE_BLOCK: tl.constexpr", "BLOCK_P: tl.constexpr"]
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"def group_norm({', '.join(params)}):",
             f"    rows = {pid} * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
             "    row_mask = rows < n_rows",
             "    row_off = rows * n_cols",
             "    cols0 = tl.arange(0, BLOCK_C)[None, :]",
             "    ch0 = (rows % n_groups) * group_channels"]
    if fused is not None:
        lines.append("    n_idx = rows // n_groups")
    store = _normalize_store(acc, out_dtype, fused)
    if split:
        # Chan's combination of the parts: mean = sum(n_i mean_i) / n,
        # M2 = sum(M2_i) + sum(n_i (mean_i - mean)^2); every part but the last holds `chunk` columns
        lines += ["    parts = tl.arange(0, BLOCK_P)[None, :]",
                  "    pmask = row_mask & (parts < n_parts)",
                  "    p_at = p_ptr + p_off + (rows * n_parts + parts) * 2",
                  f"    pm = tl.load(p_at, mask=pmask, other=0).to({acc})",
                  f"    pq = tl.load(p_at + 1, mask=pmask, other=0).to({acc})",
                  f"    pn = tl.minimum(tl.maximum(n_cols - parts * chunk, 0), chunk).to({acc})",
                  "    mean = tl.sum(tl.where(pmask, pn * pm, 0.0), 1, keep_dims=True) / n_cols",
                  "    dm = tl.where(pmask, pm - mean, 0.0)",
                  "    m2 = tl.sum(pq, 1, keep_dims=True) + tl.sum(pn * dm * dm, 1, keep_dims=True)",
                  "    rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)",
                  "    start = tl.program_id(1) * chunk",
                  "    limit = tl.minimum(start + chunk, n_cols)",
                  "    for c0 in range(start, limit, BLOCK_C):"]
        lines += _indent(_load(acc, "limit", "c0") + store, 2)
    else:
        lines += ["    limit = n_cols", "    if ONE_BLOCK:"]
        lines += _indent(_load(acc, "limit", "0"), 2)
        lines += _indent(["mean = tl.sum(x, 1, keep_dims=True) / n_cols",
                          "d = tl.where(mask, x - mean, 0.0)",
                          "rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1, keep_dims=True) / n_cols + eps)"] + store, 2)
        lines += ["    else:",
                  f"        mean = tl.zeros([BLOCK_R, 1], {acc})",
                  f"        m2 = tl.zeros([BLOCK_R, 1], {acc})",
                  "        for c0 in range(0, n_cols, BLOCK_C):"]
        lines += _indent(_load(acc, "limit", "c0") + _chan_update(acc, "c0"), 3)
        lines += ["        rstd = 1.0 / tl.sqrt(m2 / n_cols + eps)",
                  "        for c0 in range(0, n_cols, BLOCK_C):"]
        lines += _indent(_load(acc, "limit", "c0") + store, 3)
    header = (f"group_norm in={in_dtype.short} out={out_dtype.short} acc={acc_dtype.short} split={split} "
              f"wide={wide}" + (fused.header() if fused is not None else ""))
    return render("group_norm", header, "\n".join(lines))


def render_group_norm_stats(in_dtype: DType, acc_dtype: DType, wide: bool = False) -> KernelSource:
    """Stage one of the split form: (mean, M2) of part ``program_id(1)`` (``chunk`` columns) of row
    ``program_id(0)``, written as two ``acc`` values at ``(row * n_parts + part) * 2``."""
    acc = TL[acc_dtype]
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = ["def group_norm_stats(x_ptr, x_off, p_ptr, p_off, n_cols, chunk, n_parts, BLOCK_C: tl.constexpr):",
             f"    rows = {pid} + tl.arange(0, 1)[:, None]",
             "    row_mask = rows >= 0",
             "    row_off = rows * n_cols",
             "    cols0 = tl.arange(0, BLOCK_C)[None, :]",
             "    start = tl.program_id(1) * chunk",
             "    limit = tl.minimum(start + chunk, n_cols)",
             f"    mean = tl.zeros([1, 1], {acc})",
             f"    m2 = tl.zeros([1, 1], {acc})",
             "    for c0 in range(start, limit, BLOCK_C):"]
    lines += _indent(_load(acc, "limit", "c0") + _chan_update(acc, "(c0 - start)"), 2)
    lines += ["    p_at = p_ptr + p_off + (rows * n_parts + tl.program_id(1)) * 2",
              "    tl.store(p_at, mean)",
              "    tl.store(p_at + 1, m2)"]
    header = f"group_norm_stats in={in_dtype.short} acc={acc_dtype.short} wide={wide}"
    return render("group_norm_stats", header, "\n".join(lines))
