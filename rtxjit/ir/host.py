"""Which nodes are evaluated on the host (shape tensors, as in TensorRT) and how.

A node runs on the host when its op is a shape op (Shape, Size, Constant) or when all its inputs are
known on the host and its outputs are small integer or bool tensors: the arithmetic that computes
Reshape targets, Slice bounds and the like. Everything else is computed by generated kernels.
"""

from __future__ import annotations

import numpy as np

from rtxjit.errors import UnsupportedOpError
from rtxjit.ir.registry import Kind, OpDef
from rtxjit.ir.symint import Sym, prod
from rtxjit.ir.types import TensorType, is_static

HOST_NUMEL_LIMIT = 1024


def runs_on_host(opdef: OpDef, inputs_known: bool, out_types) -> bool:
    if opdef.kind is Kind.SHAPE:
        return True
    if not inputs_known or opdef.reference_fn is None:
        return False
    for t in out_types:
        if not is_static(t.shape) or t.dtype.is_float:
            return False
        n = 1
        for d in t.shape:
            n *= d
        if n > HOST_NUMEL_LIMIT:
            return False
    return True


def evaluate(opdef: OpDef, args: list, types: list, attrs: dict, out_types) -> list:
    """Run the op's numpy reference on host values. ``args`` holds arrays or None (omitted);
    a shape op's data inputs may be unknown: a zero-cost array of the right shape stands in."""
    values = []
    for a, t in zip(args, types):
        if a is None and t is not None:
            a = np.broadcast_to(np.zeros((), _stand_in_dtype(t)), t.shape)
        values.append(a)
    outs = opdef.run_reference(values, attrs, len(out_types))
    return [np.asarray(o).astype(t.dtype.to_numpy(), copy=False) for o, t in zip(outs, out_types)]


def evaluate_symbolic(opdef: OpDef, args: list, types: list, attrs: dict, concrete: list) -> list:
    """Per output, the host value as an object array of ints that keep the dims' expressions
    (``ir/symint.Sym``: a plan template's shape arithmetic, plan/rebind.py), or None where the op
    does not keep them. ``concrete`` (``evaluate``'s result) is what each must equal. Shape ops and
    the arithmetic of shape tensors only (numpy turns a lone Sym into an int64, so they are spelled
    out here); a comparison among them records its guard as it runs."""
    if opdef.name == "Shape":
        start, end = attrs.get("start", 0), attrs.get("end")
        outs = [_objects(list(types[0].shape)[slice(start, end)], (len(concrete[0]),))]
    elif opdef.name == "Size":
        outs = [_objects([prod(types[0].shape)], ())]
    elif not any(isinstance(a, np.ndarray) and a.dtype == object for a in args):
        return [None] * len(concrete)
    else:
        try:
            outs = [_symbolic_step(opdef.name, list(args), dict(attrs))]
        except (UnsupportedOpError, KeyError, ValueError, TypeError, IndexError):  # the concrete values stand
            return [None] * len(concrete)
    out = []
    for o, c in zip(outs, concrete):
        keep = (o is not None and o.shape == c.shape and any(isinstance(v, Sym) for v in o.reshape(-1).tolist())
                and np.array_equal(o.astype(c.dtype), c))
        out.append(o if keep else None)
    return out


def _objects(values, shape) -> np.ndarray:
    """An object array holding ``values`` (Syms stay Syms)."""
    arr = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
        arr[i] = v
    return arr.reshape(shape)


def _obj(a) -> np.ndarray:
    if isinstance(a, np.ndarray):
        return a if a.dtype == object else _objects(a.reshape(-1).tolist(), a.shape)
    return _objects([a], ())


_ARITH = {"Add": lambda a, b: a + b, "Sub": lambda a, b: a - b, "Mul": lambda a, b: a * b,
          "Div": lambda a, b: a // b, "Mod": lambda a, b: a % b, "Max": max, "Min": min,
          "Equal": lambda a, b: a == b, "Less": lambda a, b: a < b, "Greater": lambda a, b: a > b,
          "LessOrEqual": lambda a, b: a <= b, "GreaterOrEqual": lambda a, b: a >= b}
_LOGIC = {"Not": np.logical_not, "And": np.logical_and, "Or": np.logical_or}


def _symbolic_step(name: str, args: list, attrs: dict):
    """One op of shape arithmetic over object arrays; UnsupportedOpError for any other."""
    if name in ("Cast", "Identity"):
        if name == "Identity" or np.dtype(_cast_to(attrs)).kind in "iu":
            return _obj(args[0])
        raise UnsupportedOpError(f"{name} to a non-integer type")
    if name == "Gather":
        data, idx = _obj(args[0]), np.asarray(args[1]).astype(np.int64)
        axis = attrs.get("axis", 0) % data.ndim
        idx = np.where(idx < 0, idx + data.shape[axis], idx)
        taken = np.take(data, idx.reshape(-1), axis=axis)
        return _obj(taken).reshape(data.shape[:axis] + idx.shape + data.shape[axis + 1:])
    if name in ("Unsqueeze", "Squeeze"):
        axes = attrs.get("axes") if len(args) < 2 or args[1] is None else np.asarray(args[1]).reshape(-1).tolist()
        data = _obj(args[0])
        if name == "Squeeze":
            return data.reshape(tuple(d for d in data.shape if d != 1)) if axes is None else np.squeeze(data, tuple(axes))
        return np.expand_dims(data, tuple(int(a) for a in axes))
    if name == "Concat":
        return np.concatenate([_obj(a) for a in args], axis=attrs.get("axis", 0))
    if name == "Reshape":
        return _obj(args[0]).reshape([int(d) for d in np.asarray(args[1]).reshape(-1)])
    if name in _ARITH and len(args) == 2:
        a, b = np.broadcast_arrays(_obj(args[0]), _obj(args[1]))
        out = [_ARITH[name](x, y) for x, y in zip(a.reshape(-1).tolist(), b.reshape(-1).tolist())]
        return np.array(out, dtype=bool).reshape(a.shape) if out and isinstance(out[0], bool) else _objects(out, a.shape)
    if name in _LOGIC:
        return _LOGIC[name](*[np.asarray(a).astype(bool) for a in args])
    if name == "Where":
        cond = np.asarray(args[0]).astype(bool)
        c, a, b = np.broadcast_arrays(cond, _obj(args[1]), _obj(args[2]))
        return _objects([x if k else y for k, x, y in zip(c.reshape(-1).tolist(), a.reshape(-1).tolist(),
                                                         b.reshape(-1).tolist())], a.shape)
    if name == "rtxjit.Pointwise":
        from rtxjit.ops.fused import run_program

        return run_program(attrs["program"], args, lambda d, xs, at: _symbolic_step(d.name, xs, at)
                           if any(isinstance(x, np.ndarray) and x.dtype == object for x in xs)
                           else _plain(d.run_reference(xs, at, 1)[0]))
    raise UnsupportedOpError(f"{name} is not shape arithmetic")


def _plain(value):
    return value if isinstance(value, np.ndarray) else np.asarray(value)


def _cast_to(attrs: dict):
    from rtxjit.ir.types import DType

    to = attrs.get("to")
    return DType.from_onnx(to).to_numpy() if isinstance(to, int) else np.float64


def _stand_in_dtype(t: TensorType):
    """The numpy dtype of a stand-in for data a shape op does not read: the value's own, or, for
    a type numpy lacks (bf16), any (Shape and Size read only the shape)."""
    try:
        return t.dtype.to_numpy()
    except TypeError:
        return np.uint8


def const_type(value: np.ndarray) -> TensorType:
    from rtxjit.ir.types import DType

    return TensorType(DType.from_numpy(value.dtype), tuple(int(d) for d in value.shape))


def host_read_values(graph) -> set:
    """Names of the values that a plan may need on the host: every host input of a node, and,
    through the nodes that produce them with integer or bool outputs (the arithmetic that computes
    shapes: Max, Sub, Div, Concat, Cast ...), the inputs of those nodes in turn. A graph input in this
    set is read on the host as well as uploaded (CenterCropPad computes Pad's pads from its ``shape``
    input). Shape and Size read only their input's type, so the walk stops there."""
    from rtxjit.ir.registry import get_op

    producer = {v.name: node for node in graph.nodes for v in node.outputs if v is not None}
    needed, todo = set(), []
    for node in graph.nodes:
        opdef = get_op(node.op, f"node '{node.name}'", node.version)
        todo += [v for i, v in enumerate(node.inputs) if v is not None and i in opdef.host_inputs]
    while todo:
        v = todo.pop()
        if v.name in needed:
            continue
        needed.add(v.name)
        node = producer.get(v.name)
        if node is None or get_op(node.op, version=node.version).kind is Kind.SHAPE:
            continue
        if all(o is None or not o.type.dtype.is_float for o in node.outputs):
            todo += [i for i in node.inputs if i is not None]
    return needed
