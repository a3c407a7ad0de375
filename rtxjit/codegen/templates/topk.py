"""Top-k per row: the ``k`` largest (or smallest) elements of each row with their int64 indices,
sorted, equal values in index order (as onnxruntime and the ONNX spec's tie rule).

Rows and columns as in the row-reduction template: kept dims (run-time sizes, one stride set per
operand: input, values, indices) and the selected axis (one stride per operand).

Each element gets an integer *key* whose order is the wanted order: a float's bits made
order-preserving (``-0.0`` counted as ``+0.0``, NaN above ``+inf`` as onnxruntime ranks it), an
integer itself; ``largest=0`` inverts the key (``~key``), so the k-th output is always the element of
largest key, lowest index on ties, among those after the (k-1)-th in that order. The kernel selects
the k outputs one after another: with ``ONE_BLOCK`` the row's keys stay in registers, otherwise each
selection walks the row's column blocks (any row length works). That is O(k * n) per row, meant for
the small k of models (beam search, sampling, detection heads), not for full sorts.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.scan import row_index_lines
from rtxjit.ir.types import DType


def key_type(dtype: DType) -> DType:
    """The integer type of the sort keys of ``dtype``."""
    return DType.INT64 if dtype.itemsize == 8 else DType.INT32


def _key_lines(dtype: DType, largest: bool, indent: str) -> list:
    """Lines that turn the loaded tile ``x`` into its order keys ``key`` (masked columns: the least key)."""
    kt = key_type(dtype)
    ktl = TL[kt]
    bits = 64 if kt is DType.INT64 else 32
    top = f"0x{(1 << (bits - 1)) - 1:x}"
    if dtype.is_float:
        lines = ["x = tl.where(x == 0, 0.0, x)",  # -0.0 and +0.0 are equal: they tie by index
                 f"bits = x.to({ktl}, bitcast=True)",
                 f"key = tl.where(bits < 0, bits ^ {top}, bits)",
                 f"key = tl.where(x != x, {top}, key)"]  # NaN ranks above +inf
    else:
        lines = [f"key = x.to({ktl})"]
    if not largest:
        lines.append("key = ~key")
    lines.append(f"key = tl.where(mask, key, {-(1 << (bits - 1))})")
    return [indent + line for line in lines]


def _index_lines(rank: int) -> list:
    return row_index_lines(rank, (("row_off", "kst"), ("v_row", "vkst"), ("i_row", "ikst")))


def render_topk(dtype: DType, kept_rank: int, *, largest: bool, wide: bool = False) -> KernelSource:
    acc = TL[compute_type(dtype)]
    kt = key_type(dtype)
    ktl = TL[kt]
    bits = 64 if kt is DType.INT64 else 32
    kmax, kmin = (1 << (bits - 1)) - 1, -(1 << (bits - 1))
    params = (["x_ptr", "x_off", "v_ptr", "v_off", "i_ptr", "i_off", "n_rows", "n_cols", "k"]
              + [f"ksize{d}" for d in range(kept_rank)]
              + [f"{p}{d}" for p in ("kst", "vkst", "ikst") for d in range(kept_rank)]
              + ["cst", "vcst", "icst", "BLOCK_R: tl.constexpr", "BLOCK_C: tl.constexpr", "ONE_BLOCK: tl.constexpr"])
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"def topk({', '.join(params)}):",
             f"    rows = {pid} * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]",
             "    row_mask = rows < n_rows",
             "    cols0 = tl.arange(0, BLOCK_C).to(tl.int64)[None, :]"]
    lines += _index_lines(kept_rank)
    # the previous selection (key, index): the next one is the best element after it in the order
    lines += [f"    pk = tl.full([BLOCK_R, 1], {kmax}, {ktl})",
              "    pi = tl.full([BLOCK_R, 1], -1, tl.int64)"]
    best_of_tile = ["after = mask & ((key < pk) | ((key == pk) & (cols > pi)))",
                    f"bk = tl.max(tl.where(after, key, {kmin}), 1, keep_dims=True)",
                    "bi = tl.min(tl.where(after & (key == bk), cols, n_cols), 1, keep_dims=True)"]
    load = [f"x = tl.load(x_ptr + x_off + row_off + cols * cst, mask=mask, other=0).to({acc})"]
    lines += ["    if ONE_BLOCK:",
              "        cols = cols0",
              "        mask = row_mask & (cols < n_cols)"]
    lines += [f"        {line}" for line in load] + _key_lines(dtype, largest, "        ")
    lines += ["        for j in range(0, k):"]
    lines += [f"            {line}" for line in best_of_tile]
    lines += ["            sel_k = bk", "            sel_i = bi"]
    lines += _store_lines("            ")
    lines += ["    else:",
              "        for j in range(0, k):",
              f"            sel_k = tl.full([BLOCK_R, 1], {kmin}, {ktl})",
              "            sel_i = tl.full([BLOCK_R, 1], n_cols, tl.int64)",
              "            for c0 in range(0, n_cols, BLOCK_C):",
              "                cols = c0 + cols0",
              "                mask = row_mask & (cols < n_cols)"]
    lines += [f"                {line}" for line in load] + _key_lines(dtype, largest, "                ")
    lines += [f"                {line}" for line in best_of_tile]
    # blocks come in index order: a later block wins only with a strictly larger key
    lines += ["                take = (bi < n_cols) & ((bk > sel_k) | (sel_i == n_cols))",
              "                sel_k = tl.where(take, bk, sel_k)",
              "                sel_i = tl.where(take, bi, sel_i)"]
    lines += _store_lines("            ")
    header = f"topk in={dtype.short} kept_rank={kept_rank} largest={largest} wide={wide}"
    return render("topk", header, "\n".join(lines))


def _store_lines(indent: str) -> list:
    lines = ["v = tl.load(x_ptr + x_off + row_off + sel_i * cst, mask=row_mask)",
             "tl.store(v_ptr + v_off + v_row + j * vcst, v, mask=row_mask)",
             "tl.store(i_ptr + i_off + i_row + j * icst, sel_i, mask=row_mask)",
             "pk = sel_k",
             "pi = sel_i"]
    return [indent + line for line in lines]
