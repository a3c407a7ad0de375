"""Pointwise kernels: one expression over N strided inputs, written to a strided output.

Shapes and strides are run-time arguments (one compiled kernel serves every shape); the rank, the
dtypes and the expression are part of the source. In the expression, ``x0, x1, ...`` are the inputs
converted to their compute type (see ``dtypes.compute_type``), ``s0, s1, ...`` are scalar arguments
and ``idx`` is the flat output index. A copy is the expression ``x0``.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, load_cast
from rtxjit.codegen.source import KernelSource, memoized, render
from rtxjit.ir.types import DType


def flat_indices(rank: int, wide: bool) -> list:
    """Lines giving this program's flat output indices ``idx`` (``BLOCK`` of them, ``mask`` those
    below ``n``) and their coordinates ``i0 .. i{rank-1}`` over ``size0 ..`` (row-major)."""
    pid = "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"
    lines = [f"    idx = {pid} * BLOCK + tl.arange(0, BLOCK)", "    mask = idx < n", "    rem = idx"]
    for d in reversed(range(1, rank)):
        lines += [f"    i{d} = rem % size{d}", f"    rem = rem // size{d}"]
    return lines + ["    i0 = rem"]


@memoized
def render_pointwise(expr: str, in_dtypes: tuple, out_dtype: DType, rank: int, n_scalars: int = 0,
                     wide: bool = False, prologue: tuple = (), uniform: tuple = ()) -> KernelSource:
    """``prologue`` are statements (fused ops, see ``codegen/compose.py``) that run before ``expr``.
    ``uniform``: the inputs read at one address everywhere (every stride 0: a one-element constant
    such as GELU's 0.044715), each loaded once a program, not once an element (fp16 GELU's four
    constants were 32 scalar 2-byte loads a thread on sm_90)."""
    n_in = len(in_dtypes)
    params = ["out_ptr", "out_off"]
    for k in range(n_in):
        params += [f"x{k}_ptr", f"x{k}_off"]
    params += [f"s{k}" for k in range(n_scalars)]
    params += ["n"] + [f"size{d}" for d in range(rank)] + [f"out_st{d}" for d in range(rank)]
    for k in range(n_in):
        params += [f"x{k}_st{d}" for d in range(rank)]
    params.append("BLOCK: tl.constexpr")

    lines = [f"def pointwise({', '.join(params)}):", *flat_indices(rank, wide)]

    def offset(prefix: str) -> str:
        return " + ".join([f"{prefix}_off"] + [f"i{d} * {prefix}_st{d}" for d in range(rank)])

    for k, dt in enumerate(in_dtypes):
        address = f"x{k}_ptr + x{k}_off" if k in uniform else f"x{k}_ptr + {offset(f'x{k}')}, mask=mask"
        lines.append(f"    x{k} = tl.load({address}){load_cast(dt)}")
    lines.extend(f"    {line}" for line in prologue)
    lines.append(f"    y = {expr}")
    lines.append(f"    tl.store(out_ptr + {offset('out')}, y.to({TL[out_dtype]}), mask=mask)")
    header = f"pointwise rank={rank} in={[d.short for d in in_dtypes]} out={out_dtype.short}"
    if not prologue:
        header += f" expr={expr}"
    return render("pointwise", header, "\n".join(lines))


def render_concat(n_in: int, dtype: DType, rank: int, axis: int, wide: bool = False) -> KernelSource:
    """``Concat`` of ``n_in`` strided inputs along ``axis`` in one launch: each output element
    finds its input by its index along the axis (``start{k} <= i < start{k} + len{k}``) and is
    loaded from that input alone (the others' loads are masked off), so the bytes moved are the
    copies', with one launch instead of one per input (Swin's patch merging concatenates four
    strided slices, its shifted windows roll by concatenating two). Values are moved, not
    converted (``tl.where`` keeps -0.0 and NaN payloads). Arguments: ``out`` and each input as
    pointer and offset; ``n``; the output's sizes and strides; per input ``start{k}, len{k}`` and
    its strides."""
    params = ["out_ptr", "out_off"] + [p for k in range(n_in) for p in (f"x{k}_ptr", f"x{k}_off")]
    params += ["n"] + [f"size{d}" for d in range(rank)] + [f"out_st{d}" for d in range(rank)]
    for k in range(n_in):
        params += [f"start{k}", f"len{k}"] + [f"x{k}_st{d}" for d in range(rank)]
    params.append("BLOCK: tl.constexpr")
    lines = [f"def concat({', '.join(params)}):", *flat_indices(rank, wide)]
    for k in range(n_in):
        terms = [f"(i{d} - start{k})" if d == axis else f"i{d}" for d in range(rank)]
        addr = " + ".join([f"x{k}_off"] + [f"{t} * x{k}_st{d}" for d, t in enumerate(terms)])
        lines += [f"    in{k} = mask & (i{axis} >= start{k}) & (i{axis} < start{k} + len{k})",
                  f"    v{k} = tl.load(x{k}_ptr + {addr}, mask=in{k})"]
    y = f"v{n_in - 1}"
    for k in reversed(range(n_in - 1)):
        y = f"tl.where(in{k}, v{k}, {y})"
    lines += [f"    y = {y}",
              "    tl.store(out_ptr + " + " + ".join(["out_off"] + [f"i{d} * out_st{d}" for d in range(rank)])
              + ", y, mask=mask)"]
    return render("concat", f"concat inputs={n_in} rank={rank} axis={axis} dtype={dtype.short}", "\n".join(lines))
