"""Ops that ONNX defines as functions, expanded inline.

Many ONNX ops are *functions*: their schema carries a body of simpler ops (Attention and
RotaryEmbedding of opset 23, Swish, Mish, Celu, Shrink, ...), either fixed (``schema.has_function``)
or built for the node at hand from its attributes and input types
(``schema.has_context_dependent_function``). torch's exporters also emit model-local functions
(``model.functions``) in their own domains. The importer expands a node into such a body when the
registry has no kernel for the op (or not for its version), and imports the body's nodes in its
place; a body node whose op is itself missing is expanded in turn.

Expansion renames every value inside the body to a fresh name (the function's formal inputs and
outputs become the node's actual ones; an omitted optional input becomes a blank name, as ONNX
spells it), resolves the body's attribute references (``ref_attr_name``) from the node's attributes
or the defaults, and names each body node ``<node>/<body node>`` so an error inside a body names the
node it came from. onnx's own ``onnx.inliner`` inlines model-local functions only, and it works on a
whole model before the importer knows any types; schema functions need the types, so both kinds go
through the one expansion here.
"""

from __future__ import annotations

import onnx

from rtxjit.errors import ModelError, UnsupportedOpError
from rtxjit.ir.types import TensorType

DEFAULT_DOMAINS = ("", "ai.onnx")
MAX_DEPTH = 32  # nested expansions; deeper is a function that calls itself


class Names:
    """Fresh value and node names, unique across the model being imported."""

    def __init__(self, taken=()):
        self.taken = set(taken)

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.taken:
            name = f"{base}_{i}"
            i += 1
        self.taken.add(name)
        return name


def type_proto(t) -> onnx.TypeProto:
    """The ONNX type of an input as the importer knows it (an empty type for an omitted input)."""
    if not isinstance(t, TensorType):
        return onnx.TypeProto()
    dims = [d if isinstance(d, int) else str(d) for d in t.shape]
    return onnx.helper.make_tensor_type_proto(t.dtype.onnx_code, dims)


def _pick_version(versions: list, opset: int) -> int:
    """The body written for the newest opset not above the model's (the oldest one if all are)."""
    below = [v for v in versions if v <= opset]
    return max(below) if below else min(versions)


def schema_function(node: onnx.NodeProto, schema, opset: int, input_types: list, where: str):
    """(body, defaults) of a default-domain op whose schema defines it as a function, or None.

    ``input_types`` are the node's input types (``TensorType`` or None for an omitted input); a
    context-dependent body is built from them and from the node's attributes. ``defaults`` maps an
    attribute name to the schema's default ``AttributeProto``."""
    plain = list(schema.function_opset_versions) if schema.has_function else []
    context = list(schema.context_dependent_function_opset_versions) if schema.has_context_dependent_function else []
    if not plain and not context:
        return None
    defaults = {name: a.default_value for name, a in schema.attributes.items()
                if a.default_value.type != onnx.AttributeProto.UNDEFINED}
    version = _pick_version(plain + context, opset)
    try:
        if version in plain:
            text = schema.get_function_with_opset_version(version)
        else:
            filled = onnx.NodeProto()
            filled.CopyFrom(node)
            given = {a.name for a in node.attribute}
            filled.attribute.extend(a for name, a in sorted(defaults.items()) if name not in given)
            text = schema.get_context_dependent_function_with_opset_version(
                version, filled.SerializeToString(), [type_proto(t).SerializeToString() for t in input_types])
        body = onnx.FunctionProto()
        body.ParseFromString(text)
    except Exception as exc:  # onnx's C++ builders raise plain exceptions for inputs they refuse
        raise ModelError(f"{where}: ONNX cannot build the function body of {node.op_type} for this node "
                         f"(its attributes or input types do not fit the op): {exc}") from None
    if not body.node:
        raise UnsupportedOpError(f"{where}: ONNX gives no function body of {node.op_type} for this node")
    return body, defaults


def local_functions(model: onnx.ModelProto) -> dict:
    """The model's local functions by (domain, name, overload)."""
    return {(f.domain, f.name, f.overload): f for f in model.functions}


def local_defaults(fn: onnx.FunctionProto) -> dict:
    """Defaults of a local function's attributes (``attribute_proto``; ``attribute`` has none)."""
    return {a.name: a for a in fn.attribute_proto}


def body_opset(fn: onnx.FunctionProto, domain: str, fallback: int) -> int:
    """The version of ``domain`` that the body's nodes resolve their ops at."""
    for imp in fn.opset_import:
        if imp.domain == domain or (imp.domain in DEFAULT_DOMAINS and domain in DEFAULT_DOMAINS):
            return imp.version
    return fallback


def inline(node: onnx.NodeProto, node_name: str, fn: onnx.FunctionProto, defaults: dict, names: Names,
           where: str) -> list:
    """The body's nodes, renamed to stand in for ``node`` in its graph."""
    if len(node.input) > len(fn.input):
        raise ModelError(f"{where}: has {len(node.input)} inputs, its function takes at most {len(fn.input)}")
    if len(node.output) > len(fn.output):
        raise ModelError(f"{where}: has {len(node.output)} outputs, its function gives at most {len(fn.output)}")
    rename = {"": ""}
    for i, formal in enumerate(fn.input):
        rename[formal] = node.input[i] if i < len(node.input) else ""
    for i, formal in enumerate(fn.output):
        if i < len(node.output) and node.output[i]:
            rename[formal] = node.output[i]
    given = {a.name: a for a in node.attribute}

    def value(name: str) -> str:
        if name not in rename:
            rename[name] = names.fresh(f"{node_name}/{name}")
        return rename[name]

    out = []
    for i, inner in enumerate(fn.node):
        n = onnx.NodeProto()
        n.op_type, n.domain, n.overload = inner.op_type, inner.domain, inner.overload
        n.name = names.fresh(f"{node_name}/{inner.name or f'{inner.op_type}_{i}'}")
        n.doc_string = inner.doc_string
        n.input.extend(value(x) for x in inner.input)
        n.output.extend(value(x) for x in inner.output)
        for a in inner.attribute:
            if not a.ref_attr_name:
                n.attribute.append(a)
                continue
            source = given.get(a.ref_attr_name)
            if source is None:
                source = defaults.get(a.ref_attr_name)
            if source is None:
                continue  # a reference to an attribute the node omits and that has no default: omitted
            resolved = onnx.AttributeProto()
            resolved.CopyFrom(source)
            resolved.name = a.name
            n.attribute.append(resolved)
        out.append(n)
    return out
