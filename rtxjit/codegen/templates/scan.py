"""Scans along one axis: each row's running sum (CumSum), written at the input's positions.

As in the row-reduction template, a *row* is one index of the kept dims (run-time sizes, with the
input's and the output's strides) and its *columns* are the scanned axis (one stride per operand).
Each program scans a ``BLOCK_R x BLOCK_C`` tile with ``tl.cumsum``; a row longer than ``BLOCK_C``
is walked block by block with a carry (the sum of the blocks before), so any length works.

``reverse`` and ``exclusive`` are index arithmetic, not extra passes: step ``i`` of the forward scan
reads position ``n-1-i`` when reversed, and an exclusive scan reads the position one step back
(nothing at step 0), so it never subtracts (``[inf, 1]`` gives ``[0, inf]``, not NaN).
Floats accumulate in fp32 (fp64 stays fp64); integers in their own type, wrapping as onnxruntime's.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.codegen.source import KernelSource, render
from rtxjit.ir.types import DType


def row_index_lines(rank: int, offsets=(("row_off", "kst"), ("out_row", "okst"))) -> list:
    """Kernel lines that split the flat row number ``rows`` over the ``rank`` kept dims (sizes
    ``ksize{d}``) and give each ``(name, prefix)`` of ``offsets`` its row offset through strides
    ``{prefix}{d}``. Shared by the scan and top-k templates."""
    lines = ["    ri_rem = rows"]
    for d in reversed(range(rank)):
        if d:
            lines += [f"    ri{d} = ri_rem % ksize{d}", f"    ri_rem = ri_rem // ksize{d}"]
        else:
            lines.append(f"    ri{d} = ri_rem")
    for name, prefix in offsets:
        lines.append(f"    {name} = " + " + ".join(f"ri{d} * {prefix}{d}" for d in range(rank)))
    return lines


def render_cumsum(in_dtype: DType, out_dtype: DType, kept_rank: int, *, exclusive: bool, reverse: bool,
                  wide: bool = False, prod: bool = False) -> KernelSource:
    """``prod``: CumProd's running product (masked and exclusive-step loads are 1; a block's carry is
    its last column's product, which holds every column before it)."""
    acc = TL[compute_type(in_dtype)]
    unit = 1 if prod else 0
    params = (["x_ptr", "x_off", "y_ptr", "y_off", "n_rows", "n_cols"]
              + [f"ksize{d}" for d in range(kept_rank)] + [f"kst{d}" for d in range(kept_rank)]
              + [f"okst{d}" for d in range(kept_rank)]
              + ["cst", "ocst", "BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr"])
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    cols0 = "tl.arange(0, BLOCK_C).to(tl.int64)" if wide else "tl.arange(0, BLOCK_C)"
    step = "n_cols - 1 - i" if reverse else "i"  # the position that forward step i writes
    src = "n_cols - i" if reverse else "i - 1"  # the position an exclusive step i reads
    lines = [f"def cumsum({', '.join(params)}):",
             f"    rows = {pid} * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
             "    row_mask = rows < n_rows",
             f"    cols0 = {cols0}[None, :]"]
    lines += row_index_lines(kept_rank)
    lines += [f"    carry = tl.zeros([BLOCK_R, 1], {acc}) + {unit}",
              "    for c0 in range(0, n_cols, BLOCK_C):",
              "        i = c0 + cols0",
              "        mask = row_mask & (i < n_cols)",
              f"        pos = {step}"]
    if exclusive:
        lines += [f"        src = {src}",
                  f"        x = tl.load(x_ptr + x_off + row_off + src * cst, mask=mask & (i > 0), other={unit})"
                  f".to({acc})"]
    else:
        lines.append(f"        x = tl.load(x_ptr + x_off + row_off + pos * cst, mask=mask, other={unit}).to({acc})")
    if prod:
        lines += ["        y = carry * tl.cumprod(x, 1)",
                  f"        tl.store(y_ptr + y_off + out_row + pos * ocst, y.to({TL[out_dtype]}), mask=mask)",
                  "        carry = tl.sum(tl.where(cols0 == BLOCK_C - 1, y, 0), 1, keep_dims=True)"]
    else:
        lines += ["        y = carry + tl.cumsum(x, 1)",
                  f"        tl.store(y_ptr + y_off + out_row + pos * ocst, y.to({TL[out_dtype]}), mask=mask)",
                  "        carry = carry + tl.sum(x, 1, keep_dims=True)"]
    header = (f"{'cumprod' if prod else 'cumsum'} in={in_dtype.short} out={out_dtype.short} kept_rank={kept_rank} "
              f"exclusive={exclusive} reverse={reverse} wide={wide}")
    return render("cumsum", header, "\n".join(lines))
