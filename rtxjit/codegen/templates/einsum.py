"""The generic Einsum kernel: a product of strided operands, summed over the contracted letters.

``out[o] = sum_r prod_k x_k[x_k_off + o . x_k_ost + r . x_k_rst]`` where ``o`` runs over the
(contiguous) output's dims and ``r`` over the contracted letters' dims. Each operand has one stride
per output dim and per contracted dim: 0 where the operand lacks the letter or broadcasts it, the sum
of its axes' strides where a letter repeats in its term (a diagonal). A program computes
``BLOCK_O`` outputs and walks the contracted elements ``BLOCK_R`` at a time; without contracted
letters it is a pointwise product. Two-operand products with contracted letters on float types go to
the tiled matmul template instead (ops/einsum.py); this kernel serves the rest (one or three or more
operands, sums, diagonals, outer products, integers).

Floats accumulate in fp32 (fp64 stays fp64); integers in their own type.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.codegen.source import KernelSource, render
from rtxjit.ir.types import DType


def _split(var: str, prefix: str, rank: int, sizes: str, indent: str) -> list:
    lines = [f"{indent}{prefix}_rem = {var}"]
    for d in reversed(range(rank)):
        if d:
            lines += [f"{indent}{prefix}{d} = {prefix}_rem % {sizes}{d}",
                      f"{indent}{prefix}_rem = {prefix}_rem // {sizes}{d}"]
        else:
            lines.append(f"{indent}{prefix}0 = {prefix}_rem")
    return lines


def _dot(prefix: str, strides: str, rank: int, start: str) -> str:
    return " + ".join([start] + [f"{prefix}{d} * {strides}{d}" for d in range(rank)])


def render_einsum(dtype: DType, n_operands: int, out_rank: int, red_rank: int, wide: bool = False) -> KernelSource:
    acc = TL[compute_type(dtype)]
    params = ["out_ptr", "out_off"]
    for k in range(n_operands):
        params += [f"x{k}_ptr", f"x{k}_off"]
    params += ["n_out", "n_red"] + [f"osize{d}" for d in range(out_rank)] + [f"rsize{d}" for d in range(red_rank)]
    for k in range(n_operands):
        params += [f"x{k}_ost{d}" for d in range(out_rank)] + [f"x{k}_rst{d}" for d in range(red_rank)]
    params += ["BLOCK_O: tl.constexpr", "BLOCK_R: tl.constexpr"]
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"def einsum({', '.join(params)}):",
             f"    o = {pid} * BLOCK_O + tl.arange(0, BLOCK_O)",
             "    omask = o < n_out"]
    if out_rank:
        lines += _split("o", "oi", out_rank, "osize", "    ")
    for k in range(n_operands):
        start = f"x{k}_off" if out_rank else f"x{k}_off + o * 0"  # a block of offsets, even for a scalar output
        lines.append(f"    x{k}_o = {_dot('oi', f'x{k}_ost', out_rank, start)}")
    if red_rank == 0:
        loads = [f"tl.load(x{k}_ptr + x{k}_o, mask=omask, other=0).to({acc})" for k in range(n_operands)]
        lines.append(f"    acc = {' * '.join(loads)}")
    else:
        lines += [f"    acc = tl.zeros([BLOCK_O], dtype={acc})",
                  "    for r0 in range(0, n_red, BLOCK_R):",
                  "        r = r0 + tl.arange(0, BLOCK_R)",
                  "        mask = omask[:, None] & (r < n_red)[None, :]"]
        lines += _split("r", "ri", red_rank, "rsize", "        ")
        loads = []
        for k in range(n_operands):
            lines.append(f"        x{k}_r = {_dot('ri', f'x{k}_rst', red_rank, '0')}")
            loads.append(f"tl.load(x{k}_ptr + x{k}_o[:, None] + x{k}_r[None, :], mask=mask, other=0).to({acc})")
        lines += [f"        p = {' * '.join(loads)}",
                  "        acc += tl.sum(p, axis=1)"]
    lines.append(f"    tl.store(out_ptr + out_off + o, acc.to({TL[dtype]}), mask=omask)")
    header = f"einsum dtype={dtype.short} operands={n_operands} out_rank={out_rank} red_rank={red_rank}"
    return render("einsum", header, "\n".join(lines))
