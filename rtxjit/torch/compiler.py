"""The ``torch.compile`` backend: ``torch.compile(model, backend="rtxjit")``.

Route: dynamo's FX graph (torch-level, before AOT autograd) is split with torch's
``CapabilityBasedPartitioner`` into parts rtxjit supports and parts it does not; each supported
part is exported *in memory* to ONNX with the TorchScript exporter (``torch.onnx.export(...,
dynamo=False)``) and run by an ``rtxjit.InferenceSession``; the rest stays eager PyTorch. Why ONNX
and not ATen -> IR directly: the ONNX importer, its op registry and the whole pass pipeline already
exist and are tested against the ONNX conformance suite, so a second frontend would duplicate them;
the TorchScript exporter needs no extra package (``dynamo=True`` needs onnxscript) and traces a
part with real example tensors, which is enough for the straight-line graphs dynamo hands over.

- Inference only: parameters and buffers (dynamo passes them as graph inputs) are baked into the
  ONNX as initializers, frozen at compile time. A call with grad mode on while an input or a
  parameter requires grad raises ``GradientError`` (use ``torch.no_grad()`` or
  ``torch.inference_mode()``).
- Support is probed per FX target: the node alone is exported and imported by rtxjit's importer;
  the answer is cached for the process. An unsupported part runs eagerly, warned once per op
  (``RtxjitFallbackWarning`` naming the ONNX op); ``options={"strict": True}`` raises
  ``UnsupportedOpError`` naming it instead. A part whose export or import fails as a whole falls
  back the same way.
- Dynamic shapes: dims that dynamo marks symbolic become named symbolic dims of the ONNX inputs
  (symbol names kept, so rtxjit checks that equal dims agree); a ``SymInt`` input of a part is
  recomputed from the shape of a tensor input that carries the same symbol. One session then
  serves every shape with its generic kernels; a size expression of input dims (``s0*s1``,
  ``s0//2``) is computed from the inputs' shapes. Dynamo compiles a static graph first and a
  symbolic one at the second distinct shape (automatic dynamic); from then on no export and no
  compile. With ``torch.compile(..., dynamic=True)`` the first graph is already symbolic: one
  export serves every shape.
- Sessions are shared by ONNX bytes (a recompile of the same graph reuses its session) and listed
  by ``sessions()``; ``options`` may carry ``device``, ``runtime_cache``, ``specialize``,
  ``precision`` and ``profiles``, passed to ``InferenceSession``.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import io
import operator
import warnings
import weakref
from typing import Optional

import onnx
import torch
import torch.fx
from torch.fx.passes.infra.partitioner import CapabilityBasedPartitioner
from torch.fx.passes.operator_support import OperatorSupportBase
from torch.utils import _pytree as pytree

from rtxjit.errors import GradientError, RtxjitError, UnsupportedOpError, UsageError  # noqa: F401 - re-exported

OPSET = 17
SESSION_OPTIONS = ("device", "runtime_cache", "specialize", "precision", "profiles")
_KNOWN_OPTIONS = set(SESSION_OPTIONS) | {"strict"}


class RtxjitFallbackWarning(UserWarning):
    """Part of a torch.compile graph runs in eager PyTorch because rtxjit cannot run an op."""


_probe_cache: dict = {}          # FX target key -> None (supported) or the name of the failing op
_warned: set = set()             # op names already warned about
_sessions_by_key: "weakref.WeakValueDictionary" = weakref.WeakValueDictionary()
_all_sessions: list = []         # weak references, creation order
_export_count = 0                # ONNX exports of graph parts (for tests)


def sessions() -> list:
    """The live ``InferenceSession`` objects this backend created, oldest first."""
    alive = [r() for r in _all_sessions]
    return [s for s in alive if s is not None]


def export_count() -> int:
    """How many graph parts were exported to ONNX in this process (probes not counted)."""
    return _export_count


# -- the backend


def backend(gm: torch.fx.GraphModule, example_inputs, options: Optional[dict] = None, **kwargs):
    """Dynamo backend: returns a callable running ``gm`` with rtxjit (unsupported parts eagerly)."""
    options = dict(options or {})
    unknown = set(options) - _KNOWN_OPTIONS
    if unknown:
        raise UsageError(f"rtxjit backend: unknown options {sorted(unknown)}; known: {sorted(_KNOWN_OPTIONS)}")
    strict = bool(options.pop("strict", False))
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    consts = {}  # placeholder name -> real tensor (parameters and buffers)
    for node, x in zip(placeholders, example_inputs):
        if isinstance(x, torch.Tensor) and _is_parameter(node, x):
            consts[node.name] = x
    if "device" not in options:
        cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in example_inputs)
        options["device"] = "cuda" if cuda else "cpu"

    support = _Support(strict)
    partitioner = CapabilityBasedPartitioner(gm, support, allows_single_node_partition=True)
    parts = partitioner.propose_partitions()
    fused = partitioner.fuse_partitions(parts) if parts else gm
    names = [n.target for n in fused.graph.nodes if n.op == "call_module" and n.target.startswith("fused_")]
    real_inputs = {n.name: x for n, x in zip(placeholders, example_inputs)}
    compiled_any = False
    for name in names:
        call = next(n for n in fused.graph.nodes if n.op == "call_module" and n.target == name)
        sub = getattr(fused, name)
        try:
            runner = _compile_part(sub, call, _part_arguments(call, real_inputs, fused), consts, options)
        except UnsupportedOpError as exc:
            if strict:
                raise
            _warn_once(str(exc), f"rtxjit: a part of the graph runs in eager PyTorch: {exc}")
            continue
        setattr(fused, name, runner)
        compiled_any = True
    fused.recompile()
    param_positions = [i for i, n in enumerate(placeholders) if n.name in consts]

    baked = {a.name for n in fused.graph.nodes if n.op == "call_module" and isinstance(getattr(fused, n.target),
                                                                                      _RtxjitPart)
             for a in n.args if isinstance(a, torch.fx.Node) and a.name in consts}
    versions = [(i, _version(example_inputs[i])) for i in param_positions if placeholders[i].name in baked]

    def compiled(*args):
        for i, v in versions:
            if _version(args[i]) != v:
                raise RtxjitError(f"rtxjit: parameter '{placeholders[i].name}' changed in place after "
                                  "torch.compile baked it into the compiled graph; call torch._dynamo.reset() "
                                  "and compile again")
        if compiled_any and torch.is_grad_enabled():
            for a in args:
                if isinstance(a, torch.Tensor) and a.requires_grad:
                    raise GradientError(
                        "rtxjit runs inference only: a torch.compile(backend='rtxjit') model was called with grad "
                        "mode on and an input or parameter that requires grad; call it under torch.no_grad() "
                        "or torch.inference_mode()")
        return fused(*args)

    compiled.rtxjit_graph = fused
    compiled.rtxjit_sessions = [m.session for m in fused.modules() if isinstance(m, _RtxjitPart)]
    compiled.rtxjit_param_positions = param_positions
    return compiled


def _version(t: torch.Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # an inference tensor has no version counter
        return -1


def _is_parameter(node: torch.fx.Node, x: torch.Tensor) -> bool:
    if isinstance(x, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else str(name)
    return "_buffers" in name or "_parameters" in name


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RtxjitFallbackWarning, stacklevel=3)


# -- support


class _Support(OperatorSupportBase):
    """A node is supported when it computes tensors and rtxjit imports its ONNX export."""

    def __init__(self, strict: bool):
        self.strict = strict

    def is_node_supported(self, submodules, node: torch.fx.Node) -> bool:
        if node.op not in ("call_function", "call_method"):
            return False
        value = node.meta.get("example_value")
        if not _all_tensors(value):
            return False  # shape arithmetic on SymInts and other host values stays in Python
        if node.target is operator.getitem and not isinstance(node.args[0].meta.get("example_value"),
                                                               torch.Tensor):
            return True   # an element of a supported multi-output op
        if _training_flag(node):
            _warn_once(f"training:{_target_name(node)}", f"rtxjit: node '{node.name}' ({_target_name(node)}) is "
                       "in training mode and runs in eager PyTorch; call model.eval() for inference")
            return False
        if _mutates(node):
            src = node.args[0] if node.args else None
            if not (isinstance(src, torch.fx.Node) and src.op in ("call_function", "call_method")
                    and self.is_node_supported(submodules, src)):
                return False  # an in-place update of a graph input or of an eager value stays eager
        failing = _probe(node)
        if failing is None:
            return True
        if self.strict:
            raise UnsupportedOpError(f"torch.compile(backend='rtxjit', strict): node '{node.name}' "
                                     f"({_target_name(node)}): {failing}")
        _warn_once(failing, f"rtxjit: node '{node.name}' ({_target_name(node)}) runs in eager PyTorch: "
                            f"{failing}")
        return False


_INPLACE_OPERATORS = {operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ipow,
                      operator.iand, operator.ior, operator.ixor, operator.setitem}


def _mutates(node: torch.fx.Node) -> bool:
    """An in-place op: ``x.add_(y)``, ``torch.relu_(x)``, ``F.relu(x, inplace=True)``, ``x += y``."""
    if node.target in _INPLACE_OPERATORS or node.kwargs.get("inplace") is True:
        return True
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.startswith("_"):
        return True
    return _bound_argument(node, "inplace") is True


def _training_flag(node: torch.fx.Node) -> bool:
    """``F.batch_norm(..., training=True)``, ``F.dropout(..., training=True)`` and the like."""
    return _bound_argument(node, "training") is True


def _bound_argument(node: torch.fx.Node, name: str):
    if node.op != "call_function" or not inspect.isfunction(node.target):
        return node.kwargs.get(name)
    try:
        bound = inspect.signature(node.target).bind(*node.args, **node.kwargs)
    except (TypeError, ValueError):
        return node.kwargs.get(name)
    return bound.arguments.get(name)


def _all_tensors(value) -> bool:
    leaves = pytree.tree_leaves(value)
    return bool(leaves) and all(isinstance(v, torch.Tensor) for v in leaves)


def _target_name(node: torch.fx.Node) -> str:
    t = node.target
    if isinstance(t, str):
        return f"Tensor.{t}"
    return getattr(t, "__qualname__", None) or getattr(t, "__name__", None) or str(t)


def _probe(node: torch.fx.Node) -> Optional[str]:
    """None if rtxjit imports this node's ONNX export, else a message naming the failing op
    (cached per target and argument kinds)."""
    arg_kinds = tuple(type(a).__name__ for a in pytree.tree_leaves((node.args, node.kwargs)))
    key = (node.op, _target_name(node), arg_kinds)
    if key in _probe_cache:
        return _probe_cache[key]
    tensors = []

    def real(a):
        if isinstance(a, torch.fx.Node):
            v = a.meta.get("example_value")
            if isinstance(v, torch.Tensor):
                tensors.append(_real_like(v))
                return ("__tensor__", len(tensors) - 1)
            return _hint(v)
        return _hint(a)

    args, kwargs = pytree.tree_map(real, (node.args, node.kwargs))
    target, op = node.target, node.op

    class One(torch.nn.Module):
        def forward(self, *xs):
            def put(a):
                return xs[a[1]] if isinstance(a, tuple) and len(a) == 2 and a[0] == "__tensor__" else a

            a, k = pytree.tree_map(put, (args, kwargs), is_leaf=lambda v: isinstance(v, tuple) and len(v) == 2
                                   and v[0] == "__tensor__")
            if op == "call_method":
                return getattr(a[0], target)(*a[1:], **k)
            return target(*a, **k)

    try:
        model = _export(One(), tuple(tensors), [f"i{i}" for i in range(len(tensors))], {})
        from rtxjit.onnx.importer import import_model

        import_model(model)
        result = None
    except UnsupportedOpError as exc:
        result = str(exc)
    except Exception as exc:  # the exporter cannot express it: also a fallback
        result = f"ONNX export of {_target_name(node)} failed: {type(exc).__name__}: {str(exc)[:200]}"
    _probe_cache[key] = result
    return result


def _hint(v):
    if isinstance(v, torch.SymInt):
        return int(v.node.hint)
    if isinstance(v, torch.SymFloat):
        return float(v.node.hint)
    if isinstance(v, torch.SymBool):
        return bool(v.node.hint)
    if isinstance(v, (list, tuple)):
        return type(v)(_hint(x) for x in v)
    return v


def _real_like(fake: torch.Tensor) -> torch.Tensor:
    """A real tensor of ``fake``'s shape, dtype and device (the part's weights live there too)."""
    shape = [_hint(d) for d in fake.shape]
    if fake.dtype.is_floating_point:
        return torch.randn(shape, dtype=fake.dtype, device=fake.device)
    return torch.zeros(shape, dtype=fake.dtype, device=fake.device)


def _export(module: torch.nn.Module, args: tuple, input_names: list, dynamic_axes: dict) -> onnx.ModelProto:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module.eval()
        with torch.no_grad():
            torch.onnx.export(module, args, buf, dynamo=False, opset_version=OPSET, input_names=input_names,
                              dynamic_axes=dynamic_axes or None, do_constant_folding=True)
    return onnx.load_from_string(buf.getvalue())


# -- compiling a part


def _part_arguments(call: torch.fx.Node, real_inputs: dict, owner: torch.fx.GraphModule) -> tuple:
    """Real values for a part's arguments, to trace it with: the example inputs for graph inputs,
    tensors of the recorded shape and dtype for values computed in the graph (tracing needs their
    shapes only; running the graph here would repeat its side effects)."""

    def real(a):
        if not isinstance(a, torch.fx.Node):
            return _hint(a)
        if a.op == "placeholder":
            return _hint(real_inputs[a.name])
        if a.op == "get_attr":
            return functools.reduce(getattr, a.target.split("."), owner)
        v = a.meta.get("example_value")
        return _real_like(v) if isinstance(v, torch.Tensor) else pytree.tree_map(_hint_leaf, v)

    return tuple(real(a) for a in call.args)


def _hint_leaf(v):
    return _real_like(v) if isinstance(v, torch.Tensor) else _hint(v)


class _Exportable(torch.nn.Module):
    """A part with its constants as buffers; takes only its tensor inputs, recomputes SymInts from
    their shapes, returns its outputs flattened."""

    def __init__(self, sub: torch.fx.GraphModule, specs: list, consts: dict):
        super().__init__()
        self.sub = sub
        self.specs = specs
        for name, t in consts.items():
            self.register_buffer(name, t.detach(), persistent=True)

    def forward(self, *xs):
        args = []
        for kind, a, b in self.specs:
            if kind == "input":
                args.append(xs[a])
            elif kind == "const":
                args.append(getattr(self, a))
            elif kind == "size":
                args.append(_sym_value(a, b, xs))
            else:
                args.append(a)
        return tuple(pytree.tree_leaves(self.sub(*args)))


def _sym_value(expr, dims: dict, xs: tuple):
    """The value of dynamo's size expression ``expr`` (a sympy expression over the symbols of input
    dims, ``dims``: symbol -> (input, dim)), computed from the inputs' shapes so that the ONNX
    tracer records it as shape arithmetic."""
    import sympy

    if expr.is_Integer:
        return int(expr)
    if expr.is_Symbol:
        k, d = dims[expr]
        return xs[k].shape[d]
    values = [_sym_value(a, dims, xs) for a in expr.args]
    if isinstance(expr, sympy.Add):
        return functools.reduce(operator.add, values)
    if isinstance(expr, sympy.Mul):
        return functools.reduce(operator.mul, values)
    if type(expr).__name__ in ("FloorDiv", "CleanDiv"):
        return values[0] // values[1]
    if type(expr).__name__ in ("Mod", "PythonMod"):
        return values[0] % values[1]
    raise UnsupportedOpError(f"symbolic size {expr}: rtxjit cannot express {type(expr).__name__} of input dims")


class _RtxjitPart(torch.nn.Module):
    """Runs one part with an InferenceSession; output structure and devices as in eager."""

    def __init__(self, session, positions: list, feed_names: list, out_spec, out_ranks: list, out_dtypes: list):
        super().__init__()
        self.session = session
        self.positions = positions
        self.feed_names = feed_names
        self.out_spec = out_spec
        self.out_ranks = out_ranks
        self.out_dtypes = out_dtypes

    def forward(self, *args):
        feeds = {name: args[i] for name, i in zip(self.feed_names, self.positions)}
        outs = self.session.run(None, feeds)
        device = next((args[i].device for i in self.positions), None)
        fixed = []
        for t, rank, dtype in zip(outs, self.out_ranks, self.out_dtypes):
            if t.dim() != rank and rank == 0:
                t = t.reshape(())
            if device is not None and t.device != device:
                t = t.to(device)
            if t.dtype != dtype:  # the exporter may widen (an fp16 model's SDPA comes out fp32): eager's type
                t = t.to(dtype)
            fixed.append(t)
        return pytree.tree_unflatten(fixed, self.out_spec)


def _compile_part(sub: torch.fx.GraphModule, call: torch.fx.Node, real_args: tuple, consts: dict,
                  options: dict) -> _RtxjitPart:
    global _export_count
    specs, inputs, positions, dynamic_axes, buffers = [], [], [], {}, {}
    symbols = {}  # sympy expr -> (tensor input index, dim)
    for i, (arg, value) in enumerate(zip(call.args, real_args)):
        meta = arg.meta.get("example_value") if isinstance(arg, torch.fx.Node) else arg
        if isinstance(arg, torch.fx.Node) and arg.op == "placeholder" and arg.name in consts:
            name = f"c{len(buffers)}"
            buffers[name] = consts[arg.name]
            specs.append(("const", name, None))
        elif isinstance(arg, torch.fx.Node) and arg.op == "get_attr":
            name = f"c{len(buffers)}"
            buffers[name] = value
            specs.append(("const", name, None))
        elif isinstance(value, torch.Tensor):
            k = len(inputs)
            inputs.append(value)
            positions.append(i)
            specs.append(("input", k, None))
            dims = {}
            for d, s in enumerate(getattr(meta, "shape", ())):
                if isinstance(s, torch.SymInt) and not s.node.expr.is_number:
                    expr = s.node.expr
                    symbols.setdefault(expr, (k, d))
                    dims[d] = str(expr)
            if dims:
                dynamic_axes[f"i{k}"] = dims
        else:
            specs.append(("value", value, meta))
    for j, (kind, a, meta) in enumerate(specs):  # SymInt inputs: recomputed from a tensor's shape
        if kind != "value":
            continue
        if isinstance(meta, torch.SymInt) and not meta.node.expr.is_number:
            expr = meta.node.expr
            missing = [str(f) for f in expr.free_symbols if f not in symbols]
            if missing:
                raise UnsupportedOpError(f"part '{call.target}': symbolic int input {expr} uses {missing}, not a dim "
                                         "of any of its tensor inputs")
            specs[j] = ("size", expr, {f: symbols[f] for f in expr.free_symbols})
        else:
            specs[j] = ("value", a, None)
    out_values = sub(*real_args)
    leaves, out_spec = pytree.tree_flatten(out_values)
    if not all(isinstance(t, torch.Tensor) for t in leaves):
        raise UnsupportedOpError(f"part '{call.target}': returns a non-tensor value")
    try:
        model = _export(_Exportable(sub, specs, buffers), tuple(inputs), [f"i{k}" for k in range(len(inputs))],
                        dynamic_axes)
    except UnsupportedOpError:
        raise
    except Exception as exc:
        raise UnsupportedOpError(f"part '{call.target}': ONNX export failed: {type(exc).__name__}: "
                                 f"{str(exc)[:300]}") from exc
    _export_count += 1
    session = _session_for(model, options)
    feed_names = {v.name for v in session.get_inputs()}
    kept = [(f"i{k}", pos) for k, pos in enumerate(positions) if f"i{k}" in feed_names]
    return _RtxjitPart(session, [p for _, p in kept], [n for n, _ in kept], out_spec,
                       [t.dim() for t in leaves], [t.dtype for t in leaves])


def _session_for(model: onnx.ModelProto, options: dict):
    import rtxjit

    data = model.SerializeToString()
    key = hashlib.sha256(data + repr(sorted((k, str(v)) for k, v in options.items())).encode()).hexdigest()
    session = _sessions_by_key.get(key)
    if session is None:
        session = rtxjit.InferenceSession(data, **{k: v for k, v in options.items() if k in SESSION_OPTIONS})
        _sessions_by_key[key] = session
        _all_sessions[:] = [r for r in _all_sessions if r() is not None] + [weakref.ref(session)]
    return session
