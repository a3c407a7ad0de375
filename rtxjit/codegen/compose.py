"""Composing a chain of pointwise ops into straight-line Triton code.

A *program* is a tuple of steps ``(op, args, attrs)``: ``args`` refer to the program's inputs as
``("in", k)``, to an earlier step's result as ``("t", j)``, or to an omitted optional input as
``("none",)``; ``attrs`` is a sorted tuple of ``(name, value)``. Each step's op declares an ``expr``
hook (rtxjit/ir/registry.py), so composing is renaming: the step's ``x0, x1, ...`` become the names
of its arguments and its ``s0, s1, ...`` the next free scalar arguments. Intermediate results stay
in their compute type (fp32 for fp16 data): a fused chain rounds once, at the store, as TensorRT's
fused kernels do.
"""

from __future__ import annotations

import re

from rtxjit.codegen.dtypes import TL, compute_type
from rtxjit.ir.registry import get_op
from rtxjit.ir.types import DType, TensorType

_X = re.compile(r"\bx(\d+)\b")
_S = re.compile(r"\bs(\d+)\b")


def freeze(attrs: dict) -> tuple:
    """Attributes as a sorted, hashable tuple (lists become tuples)."""
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items()))


def compose(program: tuple, in_names: list, in_dtypes: list, scalar_prefix: str = "s") -> tuple:
    """``(lines, result name, scalars)``: statements computing every step, the name holding the last
    step's value, and the scalar arguments they read (named ``{scalar_prefix}0, 1, ...``)."""
    lines, scalars, done = [], [], []
    for j, (op_name, args, attrs) in enumerate(program):
        dtypes = [None if a[0] == "none" else _dtype(a, in_dtypes, done) for a in args]
        names = [_name(a, in_names) for a in args if a[0] != "none"]
        out_dtype = get_op(op_name).infer([None if d is None else TensorType(d, ()) for d in dtypes],
                                          dict(attrs), 1)[0].dtype
        expr, step_scalars = get_op(op_name).expr_fn(dtypes, out_dtype, dict(attrs))
        base = len(scalars)
        expr = _X.sub(lambda m: names[int(m.group(1))], expr)
        expr = _S.sub(lambda m: f"{scalar_prefix}{base + int(m.group(1))}", expr)
        lines.append(f"t{j} = ({expr}).to({TL[compute_type(out_dtype)]})")
        scalars.extend(step_scalars)
        done.append(out_dtype)
    return lines, f"t{len(program) - 1}", tuple(scalars)


def _dtype(ref: tuple, in_dtypes: list, steps: list) -> DType:
    return in_dtypes[ref[1]] if ref[0] == "in" else steps[ref[1]]


def _name(ref: tuple, in_names: list) -> str:
    return in_names[ref[1]] if ref[0] == "in" else f"t{ref[1]}"
