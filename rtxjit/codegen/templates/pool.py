"""Window pooling (MaxPool, AveragePool) over N-C-spatial tensors of any spatial rank.

One program computes ``BLOCK`` output elements; each loops over its window with run-time bounds
(kernel sizes, strides, pads, dilations and every size are arguments, so one compiled kernel serves
every shape and every pooling geometry). The spatial rank, the mode, the dtype and whether MaxPool
writes Indices are part of the source.

Arguments: the input is contiguous; ``plane`` is the number of elements of one (n, c) plane and
``ist{d}`` the input's stride of spatial dim d. AveragePool counts the window positions inside
``[lo{d}, hi{d})``: the input itself (count_include_pad=0) or the input and its pads (=1).
MaxPool's Indices are ``nc * plane + sum(h{d} * imul{d})`` (row- or column-major, storage_order).
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL
from rtxjit.codegen.source import KernelSource, render
from rtxjit.codegen.templates.reduce import acc_type, extreme_literal
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType


def _params(mode: str, rank: int, indices: bool) -> list:
    p = ["x_ptr", "x_off", "y_ptr", "y_off"] + (["i_ptr", "i_off"] if indices else []) + ["n", "plane"]
    for name in ("isize", "osize", "k", "st", "pad", "dil", "ist"):
        p += [f"{name}{d}" for d in range(rank)]
    if mode == "avg":
        p += [f"lo{d}" for d in range(rank)] + [f"hi{d}" for d in range(rank)]
    if indices:
        p += [f"imul{d}" for d in range(rank)]
    return p + ["BLOCK: tl.constexpr"]


def _window_loops(mode: str, rank: int, indices: bool, acc: str, other: str, p: int = 2) -> list:
    """Nested loops over the window, one per spatial dim; the innermost loads one input element
    per output (``other`` where it falls outside the input) and updates the accumulators."""
    lines = []
    for d in range(rank):
        pad = "    " * (d + 1)
        lines += [f"{pad}for j{d} in range(0, k{d}):",
                  f"{pad}    h{d} = o{d} * st{d} - pad{d} + j{d} * dil{d}",
                  f"{pad}    ok{d} = {'mask' if d == 0 else f'ok{d - 1}'} & (h{d} >= 0) & (h{d} < isize{d})"]
        if mode == "avg":
            prev = "" if d == 0 else f"in{d - 1} & "
            lines.append(f"{pad}    in{d} = {prev}(h{d} >= lo{d}) & (h{d} < hi{d})")
    pad = "    " * (rank + 1)
    last = rank - 1
    offset = " + ".join(f"h{d} * ist{d}" for d in range(rank))
    lines.append(f"{pad}v = tl.load(x_ptr + base + {offset}, mask=ok{last}, other={other}).to({acc})")
    if mode == "avg":
        lines += [f"{pad}acc += v", f"{pad}cnt += in{last}.to(tl.float32)"]
    elif mode == "lp":
        power = {1: "tl.abs(v)", 2: "v * v"}.get(p, f"tl.exp({float(p)} * tl.log(tl.abs(v)))")
        lines.append(f"{pad}acc += {power}")
    elif indices:
        flat = " + ".join(f"h{d} * imul{d}" for d in range(rank))
        lines += [f"{pad}take = ok{last} & ((v > acc) | ((v != v) & (acc == acc)))",  # NaN wins, as in max
                  f"{pad}acc = tl.where(take, v, acc)",
                  f"{pad}arg = tl.where(take, nc * plane + {flat}, arg)"]
    else:
        lines.append(f"{pad}acc = tl.maximum(acc, v, propagate_nan=tl.PropagateNan.ALL)")  # NaN in, NaN out
    return lines


def render_pool(mode: str, dtype: DType, rank: int, indices: bool = False, wide: bool = False,
                p: int = 2) -> KernelSource:
    """``mode`` is "max", "avg" or "lp" (LpPool: ``(sum |x|^p)^(1/p)`` over the window, padding
    adding zeros); ``rank`` the number of spatial dims."""
    if mode not in ("max", "avg", "lp"):
        raise InternalError(f"unknown pooling mode '{mode}'")
    acc = TL[acc_type(dtype)]
    pid = "tl.program_id(0).to(tl.int64)" if wide or indices else "tl.program_id(0)"
    lines = [f"def pool_{mode}({', '.join(_params(mode, rank, indices))}):",
             f"    idx = {pid} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = idx < n",
             "    rem = idx"]
    for d in reversed(range(rank)):
        lines += [f"    o{d} = rem % osize{d}", f"    rem = rem // osize{d}"]
    lines += ["    nc = rem", "    base = x_off + nc * plane"]
    other = "0" if mode in ("avg", "lp") else extreme_literal(dtype, lowest=True)
    lines.append(f"    acc = tl.full([BLOCK], {other}, {acc})")
    if mode == "avg":
        lines.append("    cnt = tl.zeros([BLOCK], tl.float32)")
    if indices:
        lines.append("    arg = tl.zeros([BLOCK], tl.int64)")
    lines += _window_loops(mode, rank, indices, acc, other, p)
    result = {"avg": "acc / cnt", "lp": {1: "acc", 2: "tl.sqrt(acc)"}.get(p, f"tl.exp(tl.log(acc) / {float(p)})")}.get(
        mode, "acc")
    lines.append(f"    tl.store(y_ptr + y_off + idx, ({result}).to({TL[dtype]}), mask=mask)")
    if indices:
        lines.append("    tl.store(i_ptr + i_off + idx, arg, mask=mask)")
    header = f"pool mode={mode} dtype={dtype.short} rank={rank} indices={indices} wide={wide}"
    header += f" p={p}" if mode == "lp" else ""
    return render(f"pool_{mode}", header, "\n".join(lines))
