"""Internal ops made by the fusion passes (rtxjit/passes/fuse_pointwise.py, fuse_epilogue.py).

``rtxjit.Pointwise``: a chain of pointwise ops (a *program*, see rtxjit/codegen/compose.py) run as
one kernel over the output's elements. ``rtxjit.Epilogue``: a MatMul, Gemm or Conv whose result
feeds such a program inside the same kernel (the templates' epilogue hook): ``("in", 0)`` of the
program is the product, ``("in", k)`` for k >= 1 the node's extra inputs after the anchor's own.
"""

from __future__ import annotations

import numpy as np

from rtxjit.codegen.compose import compose
from rtxjit.errors import InternalError, ShapeError
from rtxjit.ir.registry import Kind, get_op, op
from rtxjit.ir.types import TensorType


def run_program(program: tuple, inputs: list, step) -> object:
    """Evaluate ``program`` with ``step(opdef, args, attrs)`` per step; returns the last result."""
    results: list = []
    for op_name, args, attrs in program:
        values = [None if a[0] == "none" else (inputs[a[1]] if a[0] == "in" else results[a[1]]) for a in args]
        results.append(step(get_op(op_name), values, dict(attrs)))
    return results[-1]


def program_type(program: tuple, types: list) -> TensorType:
    return run_program(program, types, lambda d, args, attrs: d.infer(args, attrs, 1)[0])


def program_reference(program: tuple, arrays: list):
    return run_program(program, arrays, lambda d, args, attrs: d.run_reference(args, attrs, 1)[0])


@op("rtxjit.Pointwise", since=1, kind=Kind.POINTWISE)
def fused_pointwise(*xs: TensorType, program: tuple) -> TensorType:
    return program_type(program, list(xs))


fused_pointwise.reference(lambda *xs, program: program_reference(program, list(xs)))


@fused_pointwise.lower
def _(ctx, *xs, program):
    lines, result, scalars = compose(program, [f"x{k}" for k in range(len(xs))], [x.dtype for x in xs])
    out = ctx.pointwise_output(list(xs))
    ctx.pointwise(result, list(xs), out, scalars, prologue=tuple(lines))
    if out is not ctx.outputs[0]:
        ctx.alias(0, out)


@op("rtxjit.Epilogue", since=1, kind=Kind.MATMUL)
def epilogue(*xs: TensorType, anchor: str, anchor_attrs: tuple, n_anchor: int, program: tuple) -> TensorType:
    product = get_op(anchor).infer(list(xs[:n_anchor]), dict(anchor_attrs), 1)[0]
    out = program_type(program, [product] + list(xs[n_anchor:]))
    if out.shape != product.shape:
        raise ShapeError(f"an epilogue must keep the product's shape {product.shape}, got {out.shape}")
    return out


@epilogue.reference
def _(*xs, anchor, anchor_attrs, n_anchor, program):
    product = get_op(anchor).run_reference(list(xs[:n_anchor]), dict(anchor_attrs), 1)[0]
    return program_reference(program, [np.asarray(product)] + list(xs[n_anchor:]))


@epilogue.lower
def _(ctx, *xs, anchor, anchor_attrs, n_anchor, program):
    ctx.epilogue = (program, [e.broadcast_to(ctx.outputs[0].shape) for e in xs[n_anchor:]])
    get_op(anchor).lower_fn(ctx, *xs[:n_anchor], **dict(anchor_attrs))
    if ctx.epilogue is not None:
        raise InternalError(f"{ctx.where}: {anchor}'s lowering did not apply its epilogue")
