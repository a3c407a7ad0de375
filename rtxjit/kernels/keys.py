"""What identifies one compilation of a plan's kernel: its kind (generic or specialized), the
source of a specialized kernel, what Triton's specialization sees of its arguments, and its binary
key in a kernel store (kernels/store.py) or an engine.

Below the executor, the compiler and the warm start, which all read these (they used to import each
other for them, inside functions to hide the cycle)."""

from __future__ import annotations

from rtxjit.cache.keys import cache_key, target_of
from rtxjit.codegen.source import parameters, specialize
from rtxjit.kernels import binaries
from rtxjit.kernels.tensors import torch_dtype
from rtxjit.plan.plan import Buf, Launch

GENERIC, SPECIALIZED = "generic", "specialized"


def shape_params(step: Launch) -> list:
    """Names of the kernel parameters that a specialized kernel takes as constants: the integer
    arguments that are not buffer offsets (an offset is the integer right after a buffer pointer;
    offsets differ between the layers that share a kernel, so they stay runtime arguments)."""
    names = [name for name, _ in parameters(step.kernel)]
    out = []
    for j, a in enumerate(step.args):
        if isinstance(a, int) and not isinstance(a, bool) and not (j > 0 and isinstance(step.args[j - 1], Buf)):
            out.append(names[j])
    return out


def specialized_source(step: Launch):
    """The source of ``step``'s specialized kernel."""
    return specialize(step.kernel, shape_params(step))


def arg_classes(args: tuple, generic: bool) -> tuple:
    """What Triton's specialization sees of the arguments (equal classes: one compilation)."""
    out = []
    for a in args:
        if isinstance(a, bool) or not isinstance(a, int):
            out.append(str(a) if not isinstance(a, float) else "f")
        elif generic:
            out.append("i" if -2**31 <= a < 2**31 else "l")
        else:
            out.append((a, a % 16 == 0, a == 1))
    return tuple(out)


def item_key(device, src_key: str, generic: bool, args: tuple, constexprs: dict) -> str:
    """The binary key of one compilation: ``args`` with buffers as torch dtypes."""
    return cache_key(target=target_of(device),
                     **binaries.binary_key(src_key, generic, arg_classes(args, generic), constexprs))


def step_args(plan, step: Launch) -> tuple:
    """``step``'s launch arguments with its buffers as their torch dtypes (what a compile needs)."""
    return tuple(torch_dtype(plan.buffers[a.index].dtype) if isinstance(a, Buf) else a for a in step.args)


def step_key(device, plan, step: Launch, kind: str, constexprs: dict) -> str:
    """The binary key of ``step``'s ``kind`` kernel with ``constexprs``."""
    src = step.kernel if kind == GENERIC else specialized_source(step)
    return item_key(device, src.key, kind == GENERIC, step_args(plan, step), constexprs)


