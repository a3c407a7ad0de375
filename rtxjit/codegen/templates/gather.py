"""Gather along one axis: ``out[o, j, k] = data[o, idx[j], k]`` over contiguous data and indices.

Negative indices count from the end, as ONNX says; the axis length, outer and inner sizes are
run-time arguments. An index outside ``[-axis_len, axis_len)`` is masked: nothing is read outside
the table, and its output elements are 0 (onnxruntime rejects such an index; rtxjit never faults).
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.ir.types import DType


def render_gather(dtype: DType, index_dtype: DType, wide: bool = False) -> KernelSource:
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    body = f"""
def gather(out_ptr, out_off, data_ptr, data_off, idx_ptr, idx_off, n, n_idx, inner, axis_len,
           BLOCK: tl.constexpr):
    i = {pid} * BLOCK + tl.arange(0, BLOCK)
    mask = i < n
    k = i % inner
    j = (i // inner) % n_idx
    o = i // (inner * n_idx)
    src = tl.load(idx_ptr + idx_off + j, mask=mask, other=0).to(tl.int64)
    src = tl.where(src < 0, src + axis_len, src)
    ok = mask & (src >= 0) & (src < axis_len)
    x = tl.load(data_ptr + data_off + (o * axis_len + src) * inner + k, mask=ok, other=0)
    tl.store(out_ptr + out_off + i, x.to({TL[dtype]}), mask=mask)
"""
    return render("gather", f"gather data={dtype.short} index={index_dtype.short}", body)


def render_gather_elements(dtype: DType, rank: int, axis: int) -> KernelSource:
    """``out[i] = data[i with i[axis] replaced by index[i]]`` (ONNX GatherElements): the output has
    the index's shape; data and index are strided views, sizes and strides run-time arguments. An
    out-of-range index reads nothing and gives 0, as in ``render_gather``."""
    params = ["out_ptr", "out_off", "data_ptr", "data_off", "idx_ptr", "idx_off", "n"]
    params += [f"size{d}" for d in range(rank)] + [f"idx_st{d}" for d in range(rank)]
    params += [f"data_st{d}" for d in range(rank)] + ["axis_len", "BLOCK: tl.constexpr"]
    lines = [f"def gather_elements({', '.join(params)}):",
             "    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)",
             "    mask = i < n",
             "    rem = i"]
    for d in reversed(range(1, rank)):
        lines += [f"    i{d} = rem % size{d}", f"    rem = rem // size{d}"]
    lines.append("    i0 = rem")
    idx_off = " + ".join(f"i{d} * idx_st{d}" for d in range(rank))
    lines += [f"    j = tl.load(idx_ptr + idx_off + {idx_off}, mask=mask, other=0).to(tl.int64)",
              "    j = tl.where(j < 0, j + axis_len, j)",
              "    ok = mask & (j >= 0) & (j < axis_len)"]
    src_off = " + ".join(f"{'j' if d == axis else f'i{d}'} * data_st{d}" for d in range(rank))
    lines += [f"    x = tl.load(data_ptr + data_off + {src_off}, mask=ok, other=0)",
              f"    tl.store(out_ptr + out_off + i, x.to({TL[dtype]}), mask=mask)"]
    return render("gather_elements", f"gather_elements data={dtype.short} rank={rank} axis={axis}", "\n".join(lines))
