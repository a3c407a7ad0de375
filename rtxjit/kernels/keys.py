"""What identifies one compilation of a plan's kernel: its kind (generic or specialized), the
source of a specialized kernel, what Triton's specialization sees of its arguments, and its binary
key in a kernel store (kernels/store.py) or an engine.

Below the executor, the compiler and the warm start, which all read these (they used to import each
other for them, inside functions to hide the cycle)."""

from __future__ import annotations

import functools

from rtxjit.cache.keys import cache_key, target_of
from rtxjit.codegen.source import KernelSource, row_count_positions, specialize
from rtxjit.kernels import binaries
from rtxjit.kernels.tensors import torch_dtype
from rtxjit.plan.plan import Buf, Launch

GENERIC, SPECIALIZED = "generic", "specialized"


# Specialized kernels serve a *bucket* of shapes: a launch's dynamic sizes (those not compiled into
# its fallback kernel as static, plan/statics.py) stay run-time arguments, which Triton specializes
# as it does any integer argument (32 or 64 bits, a multiple of 16 or not, equal to 1 or not), and
# the tile configuration is the plan's for the binding (heuristic tiles for sizes rounded up to
# powers of two; timed once per such bucket, plan/autotune.py). Shapes that agree on those share one
# binary, so a new shape near one specialized before compiles nothing; the kernel masks with the
# true sizes, as the fallback does. EXACT: every size a constexpr instead (one binary per shape; the
# behaviour before issue 17), kept to compare the two on a GPU.
EXACT = False


def shape_params(step: Launch) -> list:
    """Names of the kernel parameters that ``step``'s specialized kernel takes as constants: its
    static sizes (already constexprs of ``step.kernel``), or with ``EXACT`` every size argument."""
    if EXACT:
        return [name for _, name in step.size_args()]
    return list(step.static)


def specialized_source(step: Launch):
    """The source of ``step``'s specialized kernel (``step.kernel`` itself unless ``EXACT``)."""
    return specialize(step.kernel, shape_params(step))


def arg_classes(args: tuple, generic: bool, src: KernelSource = None) -> tuple:
    """What Triton's specialization sees of the arguments (equal classes: one compilation) of
    ``src`` (whose row counts no kernel specializes, ``codegen.source.ROW_COUNTS``); memoized by the
    arguments and their types (1, 1.0 and True are equal keys otherwise): a new binding asks it of
    every launch three times (generic kernels, the kernel store, the launcher), ~20 us each."""
    args = tuple(args)
    rows = () if src is None or generic else row_count_positions(src)
    try:
        return _arg_classes(args, tuple(map(type, args)), bool(generic), EXACT, rows)
    except TypeError:  # an unhashable argument: classed without the memo
        return _arg_classes.__wrapped__(args, (), bool(generic), EXACT, rows)


@functools.lru_cache(maxsize=1 << 14)
def _arg_classes(args: tuple, types: tuple, generic: bool, exact: bool, rows: tuple = ()) -> tuple:
    """``arg_classes``' work. The
    values of static sizes are in the kernel's source (``with_static``), so they need no class of
    their own; a generic kernel specializes no run-time integer, a bucketed specialized kernel
    only as Triton does but for its row counts (positions ``rows``), an ``EXACT`` one is compiled
    for every value. A buffer's offset (the integer right after its pointer) keeps Triton's classes
    in a generic kernel too (``codegen.source.load_kernel``)."""
    out = []
    after_pointer = False
    for j, a in enumerate(args):
        offset, after_pointer = after_pointer, False
        if isinstance(a, bool) or not isinstance(a, int):
            out.append(str(a) if not isinstance(a, float) else "f")
            after_pointer = not isinstance(a, (bool, float, str))  # a buffer (a torch dtype here)
        elif (generic and not offset) or j in rows:
            out.append("i" if -2**31 <= a < 2**31 else "l")
        elif exact:
            out.append((a, a % 16 == 0, a == 1))
        else:
            out.append(("i" if -2**31 <= a < 2**31 else "l", a % 16 == 0, a == 1))
    return tuple(out)


def item_key(device, src: KernelSource, generic: bool, args: tuple, constexprs: dict) -> str:
    """The binary key of one compilation of ``src``: ``args`` with buffers as torch dtypes."""
    return _item_key(target_of(device), src.key, bool(generic), arg_classes(args, generic, src),
                     tuple(sorted(constexprs.items())))


@functools.lru_cache(maxsize=1 << 14)
def _item_key(target: str, src_key: str, generic: bool, classes: tuple, constexprs: tuple) -> str:
    """Memoized: a new binding asks the key of every launch (~25 us of JSON and sha256 each), and
    its launches mostly repeat an earlier binding's."""
    return cache_key(target=target, **binaries.binary_key(src_key, generic, classes, dict(constexprs)))


def step_args(plan, step: Launch) -> tuple:
    """``step``'s launch arguments with its buffers as their torch dtypes (what a compile needs).
    Kept on the launch (its arguments do not change once planned; ``dataclasses.replace`` makes a
    launch without it): a new binding asks it per launch for its generic kernels and again when the
    launch first resolves its kernel."""
    memo = step.__dict__.get("_step_args")
    if memo is not None and memo[0] is step.args:
        return memo[1]
    dtypes = plan.memo.get("torch_dtypes")  # buffer index -> torch dtype (structural, Plan.memo)
    if dtypes is None or len(dtypes) != len(plan.buffers):
        dtypes = plan.memo["torch_dtypes"] = [torch_dtype(b.dtype) for b in plan.buffers]
    out = list(step.args)
    for j, a in enumerate(out):
        if isinstance(a, Buf):
            out[j] = dtypes[a.index]
    out = tuple(out)
    step.__dict__["_step_args"] = (step.args, out)
    return out


def step_key(device, plan, step: Launch, kind: str, constexprs: dict) -> str:
    """The binary key of ``step``'s ``kind`` kernel with ``constexprs``."""
    src = step.kernel if kind == GENERIC else specialized_source(step)
    return item_key(device, src, kind == GENERIC, step_args(plan, step), constexprs)


