"""ONNX ModelProto -> rtxjit IR.

Opsets 13 to 21 of the default domain are the supported range. A node's version is the version of
its op's ONNX schema at the model's opset (at the body's own opset inside an expanded function); it
runs the registry's newest declaration of the op not above that version (``get_op``), and keeps the
version in ``Node.version`` so later stages resolve the same declaration.
Initializers become constants; shape-only nodes whose inputs are known are folded to constants.
A node whose op the registry lacks (or whose version is older than every declaration) is replaced
by the body of its ONNX function, or of the model-local function it calls (rtxjit/onnx/functions.py).

Other domains. A node of domain ``d`` (com.microsoft, a user's "my.ops") runs the registry's op
``"d.<op_type>"`` (``registry.qualified``), resolved at the version the model imports ``d`` at (its
``opset_import``; the newest declaration where it imports none), which ``Node.version`` keeps. A
declared op wins over a model-local function of the same name; a node of a domain no declaration
or local function covers is an UnsupportedOpError naming the op and its domain.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from rtxjit.errors import ModelError, RtxjitError, ShapeError, UnsupportedOpError
from rtxjit.ir import host
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.registry import all_ops, get_op, op_versions, qualified
from rtxjit.ir.rewrite import infer_args
from rtxjit.ir.types import DType, TensorType
from rtxjit.ir.verify import verify
from rtxjit.onnx import functions
from rtxjit.onnx import native as natives

MIN_OPSET = 13
MAX_TESTED_OPSET = 21


def load_model(model) -> onnx.ModelProto:
    """A ModelProto from a path, bytes or a ModelProto; unreadable input is a ModelError naming it."""
    if isinstance(model, onnx.ModelProto):
        return model
    if isinstance(model, (bytes, bytearray)):
        try:
            return onnx.load_from_string(bytes(model))
        except Exception as exc:
            raise ModelError(f"model bytes are not a valid ONNX model: {exc}") from exc
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if not path.is_file():
            raise ModelError(f"model file '{path}' does not exist")
        try:
            proto = onnx.load(str(path), load_external_data=False)
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent) or ".")
        except Exception as exc:
            raise ModelError(f"model file '{path}' is not a valid ONNX model "
                             f"(truncated or corrupt?): {type(exc).__name__}: {exc}") from exc
        if not proto.graph.node and not proto.graph.output:
            raise ModelError(f"model file '{path}' holds no graph (empty or not an ONNX file)")
        return proto
    raise ModelError(f"cannot load a model from a {type(model).__name__}")


def tensor_to_array(t: onnx.TensorProto) -> tuple:
    """(numpy array, DType) of an ONNX tensor. bf16 data is held as float32 values, fp8 and
    int4 / uint4 / int2 / uint2 (packed two or four per byte in ONNX: unpacked here) as ``ml_dtypes``
    arrays."""
    dtype = _dtype(t.data_type, f"tensor '{t.name}'")
    dims = [int(d) for d in t.dims]
    if any(d < 0 for d in dims):
        raise ModelError(f"tensor '{t.name}': negative dimension in its shape {dims}")
    count = int(np.prod(dims, dtype=object))
    per_byte = {DType.INT4: 2, DType.UINT4: 2, DType.INT2: 4, DType.UINT2: 4}.get(dtype)
    size = -(-count // per_byte) if per_byte else dtype.itemsize * count
    if t.HasField("raw_data") and len(t.raw_data) != size:
        raise ModelError(f"tensor '{t.name}': {len(t.raw_data)} bytes of data, but shape {dims} of "
                         f"{dtype.short} needs {size}")
    try:
        arr = np.asarray(numpy_helper.to_array(t))
    except (ValueError, TypeError, OverflowError, MemoryError) as exc:
        raise ModelError(f"tensor '{t.name}' ({dtype.short}, shape {dims}): its data does not fit its "
                         f"type and shape: {exc}") from None
    if dtype is DType.BF16:
        bits = arr.view(np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32), dtype
    return arr, dtype


def _dtype(code: int, where: str) -> DType:
    try:
        return DType.from_onnx(code)
    except KeyError:
        name = onnx.TensorProto.DataType.Name(code) if code in onnx.TensorProto.DataType.values() else code
        raise UnsupportedOpError(f"{where}: element type {name} is not supported") from None


def _value_type(vi: onnx.ValueInfoProto, where: str) -> TensorType:
    if not vi.type.HasField("tensor_type"):
        raise UnsupportedOpError(f"{where}: '{vi.name}' is not a tensor (sequences and maps are not supported)")
    tt = vi.type.tensor_type
    dtype = _dtype(tt.elem_type, f"{where} '{vi.name}'")
    if not tt.HasField("shape"):
        raise ModelError(f"{where} '{vi.name}' has no shape (its rank must be known)")
    dims = []
    for i, d in enumerate(tt.shape.dim):
        if d.HasField("dim_value"):
            if d.dim_value < 0:
                raise ModelError(f"{where} '{vi.name}': dimension {i} is {d.dim_value} (negative)")
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            dims.append(f"{vi.name}_d{i}")
    return TensorType(dtype, tuple(dims))


_SCALAR_FIELDS = {onnx.AttributeProto.FLOAT: "f", onnx.AttributeProto.INT: "i", onnx.AttributeProto.STRING: "s",
                  onnx.AttributeProto.TENSOR: "t"}


def _attr_value(a: onnx.AttributeProto, where: str, schema=None):
    """A Python value of an attribute, after checking its type against the op's ONNX schema."""
    expected = schema.attributes[a.name].type if schema is not None and a.name in schema.attributes else None
    lists = (onnx.AttributeProto.FLOATS, onnx.AttributeProto.INTS)
    if expected is not None and a.type != expected and not (expected == onnx.AttributeProto.TENSOR and a.type in lists):
        def name(t):
            return onnx.AttributeProto.AttributeType.Name(t) if t in onnx.AttributeProto.AttributeType.values() else t

        raise ModelError(f"{where}: attribute '{a.name}' is of type {name(a.type)}, expected {name(expected)}")
    field = _SCALAR_FIELDS.get(a.type)
    if field is not None and not a.HasField(field):
        raise ModelError(f"{where}: attribute '{a.name}' has no value")
    if a.type == onnx.AttributeProto.TENSOR:
        return tensor_to_array(a.t)[0]
    if a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS):
        raise UnsupportedOpError(f"{where}: attribute '{a.name}' holds a subgraph; control flow is not supported")
    try:
        v = onnx.helper.get_attribute_value(a)
    except (ValueError, TypeError) as exc:
        raise ModelError(f"{where}: attribute '{a.name}' holds no readable value: {exc}") from None
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def _topological(nodes: list, available: set) -> list:
    """Nodes in an order where every input is defined first; a cycle or dangling name is an error."""
    producers = {}
    for n in nodes:
        for o in n.output:
            if o:
                producers[o] = n
    order, done, state = [], set(available), {}
    for start in nodes:
        stack = [(start, False)]
        while stack:
            n, expanded = stack.pop()
            key = id(n)
            if state.get(key) == "done":
                continue
            if expanded:
                state[key] = "done"
                order.append(n)
                done.update(o for o in n.output if o)
                continue
            if state.get(key) == "active":
                raise ModelError(f"node '{n.name}' ({n.op_type}) is part of a cycle")
            state[key] = "active"
            stack.append((n, True))
            for i in n.input:
                if not i or i in done:
                    continue
                p = producers.get(i)
                if p is None:
                    raise ModelError(f"node '{n.name}' ({n.op_type}): input '{i}' is not produced by any "
                                     "node, graph input or initializer")
                if state.get(id(p)) == "active":
                    raise ModelError(f"node '{n.name}' ({n.op_type}) is part of a cycle through '{i}'")
                if state.get(id(p)) != "done":
                    stack.append((p, False))
    return order


def import_model(model) -> Graph:
    """The IR graph of a model (path, bytes or ModelProto); errors name the file when there is one."""
    if isinstance(model, (str, os.PathLike)):
        try:
            return _import(load_model(model))
        except RtxjitError as exc:
            if str(model) in str(exc):
                raise
            raise type(exc)(f"model file '{model}': {exc}") from exc
    return _import(load_model(model))


def _check_names(g: onnx.GraphProto) -> None:
    """Every name is text: protobuf hands back bytes for a string field that is not valid UTF-8."""
    def check(x, what):
        if not isinstance(x, str):
            raise ModelError(f"{what} {x[:40]!r} is not valid UTF-8 text (corrupt model?)")

    check(g.name, "graph name")
    for t in g.initializer:
        check(t.name, "initializer name")
    for vi in list(g.input) + list(g.output):
        check(vi.name, "graph input/output name")
        if vi.type.HasField("tensor_type"):
            for d in vi.type.tensor_type.shape.dim:
                check(d.dim_param, f"dimension name of '{vi.name}'")
    for n in g.node:
        for x, what in [(n.name, "node name"), (n.op_type, "op type"), (n.domain, "domain")]:
            check(x, what)
        for x in list(n.input) + list(n.output):
            check(x, f"input/output name of node '{n.name}'")
        for a in n.attribute:
            check(a.name, f"attribute name of node '{n.name}'")


def _check_window_attrs(where: str, attrs: dict) -> None:
    """The window attributes of convolutions and pools (the same names in every ONNX op that has
    them): strides, dilations and kernel sizes are positive, pads are not negative."""
    for name, low in (("strides", 1), ("dilations", 1), ("kernel_shape", 1), ("pads", 0)):
        value = attrs.get(name)
        if isinstance(value, (list, tuple)) and any(not isinstance(v, int) or v < low for v in value):
            raise ModelError(f"{where}: attribute '{name}' is {list(value)}; every entry must be >= {low}")


def _check_required_inputs(where: str, n: onnx.NodeProto, schema) -> None:
    """Every input the op's schema marks required is given (a blank name omits an optional one)."""
    if schema is None:
        return
    single = onnx.defs.OpSchema.FormalParameterOption.Single
    for i, formal in enumerate(schema.inputs):
        if formal.option == single and (i >= len(n.input) or not n.input[i]):
            raise ModelError(f"{where}: required input {i} ('{formal.name}') is missing")


def _check_size(where: str, out_types) -> None:
    """An output whose known dims alone make more than 2**63 bytes cannot exist (huge dims)."""
    for t in out_types:
        if t is not None:
            size = int(np.prod([d for d in t.shape if isinstance(d, int)], dtype=object)) * t.dtype.itemsize
            if size >= 2 ** 63:
                raise ShapeError(f"{where}: output shape {t.shape} ({t.dtype.short}) is too large "
                                 f"({size:.3g} bytes)")


def _import(proto: onnx.ModelProto) -> Graph:
    opset = None
    for imp in proto.opset_import:
        if imp.domain in ("", "ai.onnx"):
            opset = imp.version
    if opset is None:
        raise ModelError("model imports no version of the default ONNX domain (opset_import)")
    if opset < MIN_OPSET:
        raise UnsupportedOpError(f"model opset {opset} is below the supported range {MIN_OPSET}-{MAX_TESTED_OPSET}")
    g = proto.graph
    _check_names(g)
    values: dict = {}
    for init in g.initializer:
        arr, dtype = tensor_to_array(init)
        values[init.name] = Value(init.name, TensorType(dtype, tuple(int(d) for d in arr.shape)), arr)
    for sparse in g.sparse_initializer:
        raise UnsupportedOpError(f"sparse initializer '{sparse.values.name}' is not supported")
    inputs = []
    for vi in g.input:
        if vi.name in values:
            continue  # an initializer listed as input (old exporters): a constant
        v = Value(vi.name, _value_type(vi, "graph input"))
        values[vi.name] = v
        inputs.append(v)
    scope = _Scope(proto)
    nodes = []
    for i, n in enumerate(_topological(list(g.node), set(values))):
        nodes.extend(_import_or_expand(n, i, opset, values, scope, ()))
    outputs = []
    for vo in g.output:
        if vo.name not in values:
            raise ModelError(f"graph output '{vo.name}' is not produced by any node, input or initializer")
        outputs.append(values[vo.name])
    graph = Graph(g.name or "main", inputs, outputs, [n for n in nodes if n is not None], opset)
    verify(graph)
    if scope.mixed:
        warnings.warn(_mixed_types_message(scope.mixed), RuntimeWarning, stacklevel=3)
    return graph


def _mixed_types_message(mixed: list) -> str:
    where, param, dtypes = mixed[0]
    more = f" (and {len(mixed) - 1} more node(s))" if len(mixed) > 1 else ""
    return (f"rtxjit: the model is not valid ONNX: {where} binds type parameter {param} to "
            f"{' and '.join(dtypes)}{more}; onnxruntime rejects such a file, rtxjit runs it as it is. "
            f"torch.onnx's TorchScript exporter (dynamo=False) writes this for "
            f"float16 models whose scaled_dot_product_attention takes a boolean mask, and computes every later "
            f"layer in float32 (float32 copies of the weights); export with dynamo=True, or pass "
            f"precision='fp16', to run the model in float16")


def _check_type_bindings(where: str, schema, ins: list, mixed: list) -> None:
    """Inputs that the op's schema types with one parameter (``T``) have one dtype; a file that
    breaks this is recorded in ``mixed`` (warned about once per model) rather than refused: rtxjit
    can run it, and the file is what the user has."""
    if schema is None or not schema.inputs:
        return
    formals = schema.inputs
    variadic = onnx.defs.OpSchema.FormalParameterOption.Variadic
    bound: dict = {}
    for i, v in enumerate(ins):
        if i >= len(formals) and formals[-1].option != variadic:
            break
        formal = formals[min(i, len(formals) - 1)]
        if v is None or (formal.option == variadic and not formal.is_homogeneous):
            continue
        bound.setdefault(formal.type_str, []).append(v.type.dtype)
    for param, dtypes in bound.items():
        names = sorted({d.short for d in dtypes})
        if len(names) > 1:
            mixed.append((where, param, names))
            return


class _Scope:
    """What expanding functions needs across one model: the registry, the model's local functions
    and the names already taken."""

    def __init__(self, proto: onnx.ModelProto):
        self.ops = all_ops()
        self.functions = functions.local_functions(proto)
        # the version each domain is imported at ("ai.onnx" is the default domain, "")
        self.domains = {("" if imp.domain == "ai.onnx" else imp.domain): int(imp.version)
                        for imp in proto.opset_import}
        g = proto.graph
        taken = [t.name for t in g.initializer] + [vi.name for vi in list(g.input) + list(g.output)]
        for n in list(g.node) + [n for f in proto.functions for n in f.node]:
            taken += [n.name, *n.input, *n.output]
        self.names = functions.Names(taken)
        self.mixed: list = []  # nodes whose inputs bind one type parameter of their schema to several dtypes


def _import_or_expand(n: onnx.NodeProto, index: int, opset: int, values: dict, scope: _Scope, stack: tuple) -> list:
    """The IR nodes of one ONNX node: its registry op, or the imported body of its function."""
    name = n.name or f"{n.op_type}_{index}"
    where = f"node '{name}' ({n.op_type}, opset {opset})"
    native = None if n.domain not in functions.DEFAULT_DOMAINS or n.op_type in scope.ops else \
        natives.translate(n, opset, [values[i].type if i else None for i in n.input], scope.names.fresh)
    if native is not None:
        out = []
        for i, m in enumerate(native):
            out.extend(_import_or_expand(m, i, opset, values, scope, stack))
        return out
    found = _function_of(n, opset, values, scope, where)
    if found is None:
        node = _import_node(n, index, opset, values, scope.domains, scope.mixed)
        return [] if node is None else [node]
    body, defaults, key = found
    if key in stack or len(stack) >= functions.MAX_DEPTH:
        raise ModelError(f"{where}: its function calls itself (through {' -> '.join(k[1] for k in stack)})")
    inner = functions.inline(n, name, body, defaults, scope.names, where)
    body_opset = functions.body_opset(body, "", opset)
    out = []
    try:
        for i, m in enumerate(_topological(inner, set(values))):
            out.extend(_import_or_expand(m, i, body_opset, values, scope, stack + (key,)))
    except RtxjitError as exc:
        raise type(exc)(f"{where}, expanded from its function body: {exc}") from exc
    lacking = [o for o in n.output if o and o not in values]
    if lacking:
        raise ModelError(f"{where}: its function body does not compute output(s) {lacking}")
    return out


def _function_of(n: onnx.NodeProto, opset: int, values: dict, scope: _Scope, where: str):
    """(body, attribute defaults, key) of the function that stands in for the node, or None where the
    registry implements the node (or nothing does: ``_import_node`` then says so)."""
    if n.domain not in functions.DEFAULT_DOMAINS:
        if n.domain != natives.RTXJIT_DOMAIN and op_versions(qualified(n.domain, n.op_type)):
            return None  # a declaration (an op of com.microsoft, a user's custom op) runs it
        fn = scope.functions.get((n.domain, n.op_type, n.overload))
        return None if fn is None else (fn, functions.local_defaults(fn), (n.domain, n.op_type, n.overload))
    try:
        schema = onnx.defs.get_schema(n.op_type, opset)
    except Exception:  # onnx.defs.SchemaError: not an ONNX op at this opset
        return None
    versions = op_versions(n.op_type)
    if versions and schema.since_version >= versions[0].since:
        return None  # a declaration of the registry runs it
    types = [values[i].type if i else None for i in n.input]
    found = functions.schema_function(n, schema, opset, types, where)
    return None if found is None else (*found, ("", n.op_type, ""))


def _resolve(n: onnx.NodeProto, opset: int, domains: dict, where: str) -> tuple:
    """``(declaration, version, ONNX schema or None)`` of a node, by its domain (module docstring)."""
    op_name = qualified(n.domain, n.op_type)
    if n.domain == natives.RTXJIT_DOMAIN:  # rtxjit's own fused ops, written by rtxjit/onnx/native.py
        opdef = get_op(op_name, where)
        return opdef, max(opset, opdef.since), None
    default = n.domain in functions.DEFAULT_DOMAINS
    imported = opset if default else domains.get(n.domain, 0)
    try:  # the default domain's schemas, and those onnx has of other domains (ai.onnx.ml)
        schema = onnx.defs.get_schema(n.op_type, imported, "" if default else n.domain) if imported else None
    except Exception:  # onnx.defs.SchemaError: not an ONNX op at this version
        schema = None
    # the schema's version (a model's opset 20 runs GroupNormalization-18); else the domain's version
    version = schema.since_version if schema is not None else (0 if default else imported)
    opdef = get_op(op_name, where, version)
    return opdef, version or (max(opset, opdef.since) if default else opdef.since), schema


def _import_node(n: onnx.NodeProto, index: int, opset: int, values: dict, domains: dict, mixed: list):
    name = n.name or f"{n.op_type}_{index}"
    if n.domain in functions.DEFAULT_DOMAINS or n.domain == natives.RTXJIT_DOMAIN:
        where = f"node '{name}' ({n.op_type}, opset {opset})"
    else:
        where = f"node '{name}' ({n.domain}::{n.op_type}, {n.domain} version {domains.get(n.domain, 'not imported')})"
    opdef, version, schema = _resolve(n, opset, domains, where)
    attrs = opdef.bind_attrs({a.name: _attr_value(a, where, schema) for a in n.attribute}, where)
    _check_window_attrs(where, attrs)
    ins = [values[i] if i else None for i in n.input]
    _check_required_inputs(where, n, schema)
    _check_type_bindings(where, schema, ins, mixed)
    try:
        out_types = opdef.infer(infer_args(opdef, ins), attrs, len(n.output))
    except RtxjitError as exc:
        if str(exc).startswith("node '"):
            raise
        raise type(exc)(f"{where}: {exc}") from exc  # the op's inference does not know the node's name
    except (ValueError, IndexError, KeyError, TypeError) as exc:
        raise ModelError(f"{where}: {exc}") from exc
    if len(out_types) < len([o for o in n.output if o]):
        raise ModelError(f"{where}: has {len(n.output)} outputs, {n.op_type} gives {len(out_types)}")
    _check_size(where, out_types)
    known = all(v is None or v.is_const for v in ins)
    if host.runs_on_host(opdef, known, out_types) and (known or all(t.static for t in _types(ins))):
        args = [None if v is None else v.const for v in ins]
        vals = host.evaluate(opdef, args, _types(ins), attrs, out_types)
        for o, t, val in zip(n.output, out_types, vals):
            if o:
                values[o] = Value(o, t, val)
        return None
    outs = []
    for o, t in zip(n.output, out_types):
        if not o:
            outs.append(None)
            continue
        if o in values:
            raise ModelError(f"{where}: output '{o}' is already defined")
        outs.append(Value(o, t))
        values[o] = outs[-1]
    node = Node(opdef.name, name, ins, outs, attrs, version)
    for v in outs:
        if v is not None:
            v.producer = node
    return node


def _types(ins: list) -> list:
    return [None if v is None else v.type for v in ins]
