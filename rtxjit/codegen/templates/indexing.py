"""Index-tuple gathers and scatters: GatherND, ScatterND and ScatterElements.

Index semantics shared by every kernel here: a negative index counts from the end, as ONNX says;
an index still outside ``[0, dim)`` after that is masked, so no kernel reads or writes outside a
tensor. A gather then yields 0 for that element; a scatter skips that update (the output keeps the
data's value there). onnxruntime rejects such indices; rtxjit never faults on them.

Determinism of the scatters (duplicate indices):

* ``reduction="none"`` of ScatterND: each update tuple first *claims* its target slice with an
  integer ``atomic_max`` of its own number (exact, order-free), then only the claimed (highest
  numbered, i.e. last) tuple writes. The result is the sequential "last write wins" of the ONNX
  reference, on every run, while all tuples run in parallel.
* ScatterND reductions: integer add/max/min use atomics (integer add wraps exactly and max/min are
  order-free, so any order gives the same bits). Float add/mul (rounding depends on the order),
  integer mul and narrow types run ``sequential``: one program per block of slice elements walks the
  tuples in order, as the reference does.
* ScatterElements: one program per block of output *rows* (all dims but the axis); each walks the
  updates along the axis in order. A row's updates only ever land in that row, so programs never
  touch the same element and every reduction (and "none") is deterministic and ordered.

Sizes and strides are run-time arguments; ranks, the index-tuple length, dtypes and the reduction
are part of the source.
"""

from __future__ import annotations

from rtxjit.codegen.dtypes import TL, load_cast
from rtxjit.codegen.source import KernelSource, render
from rtxjit.errors import InternalError
from rtxjit.ir.types import DType

REDUCTIONS = ("none", "add", "mul", "max", "min")


def combine(reduction: str, dtype: DType, cur: str, upd: str) -> str:
    """The new value of an element ``cur`` that receives update ``upd`` (both in compute type)."""
    if reduction == "none":
        return upd
    if dtype is DType.BOOL:  # add/max are "or", mul/min are "and" on booleans
        return f"({cur} | {upd})" if reduction in ("add", "max") else f"({cur} & {upd})"
    if reduction == "add":
        return f"({cur} + {upd})"
    if reduction == "mul":
        return f"({cur} * {upd})"
    if reduction in ("max", "min"):
        nan = ", propagate_nan=tl.PropagateNan.ALL" if dtype.is_float else ""
        return f"tl.{'maximum' if reduction == 'max' else 'minimum'}({cur}, {upd}{nan})"
    raise InternalError(f"scatter reduction {reduction!r}")


def _split(var: str, prefix: str, rank: int, sizes: str) -> list:
    """Lines splitting flat index ``var`` into ``{prefix}0..`` over dims ``{sizes}0..``."""
    if rank == 0:
        return []
    lines = [f"    {prefix}_rem = {var}"]
    for d in reversed(range(1, rank)):
        lines += [f"    {prefix}{d} = {prefix}_rem % {sizes}{d}", f"    {prefix}_rem = {prefix}_rem // {sizes}{d}"]
    lines.append(f"    {prefix}0 = {prefix}_rem")
    return lines


def _dot(prefix: str, strides: str, rank: int, start: str) -> str:
    return " + ".join([start] + [f"{prefix}{d} * {strides}{d}" for d in range(rank)])


def _tuple_lines(m: int, idx_addr, indent: str = "    ", mask: str = "mask") -> list:
    """Load an index tuple of ``m >= 1`` entries (``idx_addr(j)`` is entry j's address), wrap
    negative entries and fold them into ``slot`` (sum of entry * ``dst{j}``); ``ok`` says that
    ``mask`` holds and every entry is in range."""
    lines, conds, terms = [], [mask], []
    for j in range(m):
        v = f"v{j}"
        lines += [f"{indent}{v} = tl.load({idx_addr(j)}, mask={mask}, other=0).to(tl.int64)",
                  f"{indent}{v} = tl.where({v} < 0, {v} + dim{j}, {v})"]
        conds += [f"({v} >= 0)", f"({v} < dim{j})"]
        terms.append(f"{v} * dst{j}")
    return lines + [f"{indent}ok = {' & '.join(conds)}", f"{indent}slot = {' + '.join(terms)}"]


def _pid(wide: bool) -> str:
    return "tl.program_id(0).to(tl.int64)" if wide else "tl.program_id(0)"


# ---- GatherND ----------------------------------------------------------------------------------

def render_gather_nd(dtype: DType, index_dtype: DType, rank: int, m: int, wide: bool = False) -> KernelSource:
    """``out[i] = data[base(i) + sum_j wrap(idx[ibase(i) + j * idx_last]) * dst_j]``: one program per
    block of output elements. The output's (collapsed) dims ``size0..`` each carry an index stride
    ``idx_st`` (0 for the data's slice dims) and a data stride ``data_st`` (0 for the index-only dims):
    batch dims advance both."""
    params = ["out_ptr", "out_off", "data_ptr", "data_off", "idx_ptr", "idx_off", "n"]
    params += [f"size{d}" for d in range(rank)] + [f"idx_st{d}" for d in range(rank)]
    params += [f"data_st{d}" for d in range(rank)] + ["idx_last"]
    params += [f"dim{j}" for j in range(m)] + [f"dst{j}" for j in range(m)] + ["BLOCK: tl.constexpr"]
    lines = [f"def gather_nd({', '.join(params)}):",
             f"    i = {_pid(wide)} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = i < n"]
    lines += _split("i", "i", rank, "size")
    lines += [f"    ip = {_dot('i', 'idx_st', rank, 'idx_off')}",
              f"    dp = {_dot('i', 'data_st', rank, 'data_off')}"]
    lines += _tuple_lines(m, lambda j: f"idx_ptr + ip + {j} * idx_last")
    lines += ["    x = tl.load(data_ptr + dp + slot, mask=ok, other=0)",
              f"    tl.store(out_ptr + out_off + i, x.to({TL[dtype]}), mask=mask)"]
    header = f"gather_nd data={dtype.short} index={index_dtype.short} rank={rank} tuple={m}"
    return render("gather_nd", header, "\n".join(lines))


# ---- ScatterND ---------------------------------------------------------------------------------
# Indices are contiguous ``[n_tuples, m]``, updates contiguous ``[n_tuples, slice]``, the output
# contiguous with the data's shape: tuple t's target slice starts at ``slot * slice``.

def render_scatter_nd_claim(index_dtype: DType, owner_dtype: DType, m: int, wide: bool = False) -> KernelSource:
    """``owner[slot(t)] = max(owner[slot(t)], t)`` over tuples t: the last tuple of each slot wins."""
    params = ["owner_ptr", "owner_off", "idx_ptr", "idx_off", "n_tuples"] + [f"dim{j}" for j in range(m)]
    params += [f"dst{j}" for j in range(m)] + ["BLOCK: tl.constexpr"]
    lines = [f"def scatter_nd_claim({', '.join(params)}):",
             f"    t = {_pid(wide)} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = t < n_tuples"]
    lines += _tuple_lines(m, lambda j: f"idx_ptr + idx_off + t * {m} + {j}")
    lines.append(f"    tl.atomic_max(owner_ptr + owner_off + slot, t.to({TL[owner_dtype]}), mask=ok)")
    header = f"scatter_nd_claim index={index_dtype.short} owner={owner_dtype.short} tuple={m}"
    return render("scatter_nd_claim", header, "\n".join(lines))


def render_scatter_nd(dtype: DType, index_dtype: DType, m: int, mode: str, reduction: str,
                      owner_dtype: DType = DType.INT32, wide: bool = False) -> KernelSource:
    """``mode``: ``"claimed"`` (reduction none after the claim kernel), ``"atomic"`` (exact integer
    reductions) or ``"sequential"`` (one program per block of slice elements, tuples in order)."""
    if mode not in ("claimed", "atomic", "sequential") or reduction not in REDUCTIONS:
        raise InternalError(f"scatter_nd mode {mode!r} reduction {reduction!r}")
    params = ["out_ptr", "out_off", "upd_ptr", "upd_off", "idx_ptr", "idx_off"]
    params += ["owner_ptr", "owner_off"] if mode == "claimed" else []
    params += ["n_tuples", "slice_len"] + [f"dim{j}" for j in range(m)] + [f"dst{j}" for j in range(m)]
    params.append("BLOCK: tl.constexpr")
    cast, store = load_cast(dtype), TL[dtype]
    lines = [f"def scatter_nd({', '.join(params)}):"]
    if mode == "sequential":
        lines += [f"    k = {_pid(wide)} * BLOCK + tl.arange(0, BLOCK)",
                  "    kmask = k < slice_len",
                  "    for t in range(0, n_tuples):"]
        # the tuple is loaded as a block (every lane the same address): the interpreter mishandles
        # a scalar mask combined with a block one
        lines += _tuple_lines(m, lambda j: f"idx_ptr + idx_off + t * {m} + {j} + k * 0", indent="        ",
                              mask="kmask")
        lines += ["        dst = out_ptr + out_off + slot * slice_len + k",
                  f"        u = tl.load(upd_ptr + upd_off + t * slice_len + k, mask=ok){cast}"]
        if reduction != "none":
            lines += [f"        cur = tl.load(dst, mask=ok){cast}",
                      f"        u = {combine(reduction, dtype, 'cur', 'u')}"]
        lines.append(f"        tl.store(dst, u.to({store}), mask=ok)")
    else:
        lines += [f"    e = {_pid(wide)} * BLOCK + tl.arange(0, BLOCK)",
                  "    mask = e < n_tuples * slice_len",
                  "    t = e // slice_len",
                  "    k = e % slice_len"]
        lines += _tuple_lines(m, lambda j: f"idx_ptr + idx_off + t * {m} + {j}")
        if mode == "claimed":
            lines += [f"    own = tl.load(owner_ptr + owner_off + slot, mask=ok, other=-1)",
                      f"    ok = ok & (own == t.to({TL[owner_dtype]}))"]
        lines.append("    u = tl.load(upd_ptr + upd_off + e, mask=ok)")
        if mode == "claimed":
            lines.append(f"    tl.store(out_ptr + out_off + slot * slice_len + k, u.to({store}), mask=ok)")
        else:
            fn = {"add": "atomic_add", "max": "atomic_max", "min": "atomic_min"}.get(reduction)
            if fn is None or not dtype.is_int:
                raise InternalError(f"scatter_nd: no exact atomic {reduction} for {dtype.short}")
            lines.append(f"    tl.{fn}(out_ptr + out_off + slot * slice_len + k, u.to({store}), mask=ok)")
    header = f"scatter_nd {mode} reduction={reduction} data={dtype.short} index={index_dtype.short} tuple={m}"
    return render("scatter_nd", header, "\n".join(lines))


# ---- ScatterElements ---------------------------------------------------------------------------

def render_scatter_elements(dtype: DType, index_dtype: DType, rank: int, reduction: str,
                            wide: bool = False) -> KernelSource:
    """One program per block of rows (``rank`` collapsed row dims: every dim but the axis); each
    row walks its ``axis_n`` updates in order and applies them to the output row."""
    if reduction not in REDUCTIONS:
        raise InternalError(f"scatter_elements reduction {reduction!r}")
    params = ["out_ptr", "out_off", "idx_ptr", "idx_off", "upd_ptr", "upd_off", "n_rows", "axis_n", "axis_len"]
    params += [f"size{d}" for d in range(rank)]
    for prefix in ("idx_st", "upd_st", "out_st"):
        params += [f"{prefix}{d}" for d in range(rank)]
    params += ["idx_ax", "upd_ax", "out_ax", "BLOCK: tl.constexpr"]
    cast = load_cast(dtype)
    lines = [f"def scatter_elements({', '.join(params)}):",
             f"    row = {_pid(wide)} * BLOCK + tl.arange(0, BLOCK)",
             "    mask = row < n_rows"]
    lines += _split("row", "r", rank, "size")
    lines += [f"    ip = {_dot('r', 'idx_st', rank, 'idx_off')}",
              f"    up = {_dot('r', 'upd_st', rank, 'upd_off')}",
              f"    op = {_dot('r', 'out_st', rank, 'out_off')}",
              "    for j in range(0, axis_n):",
              "        v = tl.load(idx_ptr + ip + j * idx_ax, mask=mask, other=0).to(tl.int64)",
              "        v = tl.where(v < 0, v + axis_len, v)",
              "        ok = mask & (v >= 0) & (v < axis_len)",
              f"        u = tl.load(upd_ptr + up + j * upd_ax, mask=ok){cast}",
              "        dst = out_ptr + op + v * out_ax"]
    if reduction != "none":
        lines += [f"        cur = tl.load(dst, mask=ok){cast}",
                  f"        u = {combine(reduction, dtype, 'cur', 'u')}"]
    lines.append(f"        tl.store(dst, u.to({TL[dtype]}), mask=ok)")
    header = f"scatter_elements reduction={reduction} data={dtype.short} index={index_dtype.short} rank={rank}"
    return render("scatter_elements", header, "\n".join(lines))
