"""An exact, safe round trip of an IR ``Graph`` through JSON and named arrays.

``to_document(graph)`` gives ``(doc, arrays)``: ``doc`` is plain JSON data (``json.dumps(doc,
allow_nan=False)`` works), ``arrays`` maps a key to a numpy array. ``from_document(doc, arrays)``
rebuilds the graph: ``str(from_document(*to_document(g))) == str(g)``, the same constants bit for
bit, so codegen renders the same kernels. Nothing is executed, evaluated or unpickled: attribute
values are rebuilt from a closed set of tags, arrays from their dtype names (a fixed list).

The document (``SCHEMA_VERSION`` 1)::

    {"schema": 1, "name": "main", "opset": 17,
     "inputs":  ["x", ...],                      # graph inputs, in order
     "outputs": ["y", ...],                      # graph outputs, in order
     "values":  [{"name": "x", "dtype": "fp32", "shape": ["N", 3, 32, 32]},
                 {"name": "w", "dtype": "fp16", "shape": [16, 3, 3, 3], "const": "w"}, ...],
     "nodes":   [{"op": "Conv", "name": "conv1", "version": 11,
                  "inputs": ["x", "w", null], "outputs": ["y"], "attrs": {"group": 1, ...}}, ...]}

``values`` lists every value once (dtype by its short name, dims ints or symbol strings); a
constant's ``const`` is the key of its data in ``arrays`` (its own name). ``nodes`` are in the
graph's (topological) order; ``null`` stands for an omitted optional input or output. A node's
``version`` is the ONNX version it was imported at: it selects which declaration of its op runs it
(``get_op(op, where, version)``, rtxjit/ir/registry.py), so it must be kept exactly.

Attribute values: JSON strings, ints, bools, ``null``, lists and finite floats stand for
themselves (a float always reads back as a float: ``repr`` keeps its ``.0``). Everything else is
a one-key object whose key names the tag:

    {"$tuple": [...]}                    a tuple (nested freely: fused programs are tuples)
    {"$dict": [[key, value], ...]}       a dict, keys encoded too, order kept
    {"$float": "nan" | "inf" | "-inf"}   a non-finite float ("nan:<16 hex digits>" for a NaN whose
                                         bits are not Python's default NaN)
    {"$bytes": "<base64>"}               bytes
    {"$scalar": ["float32", "<hex>"]}    a numpy scalar: dtype name and its bytes (little-endian hosts)
    {"$dtype": "fp16"}                   an rtxjit DType member
    {"$type": ["fp16", [dims]]}          an rtxjit TensorType
    {"$np_dtype": "float32"}             a numpy dtype object
    {"$array": ["float32", [shape], "<base64>"]}        an ndarray of at most INLINE_BYTES bytes
    {"$array_ref": ["<key>", "float32", [shape]]}       a larger ndarray, held in ``arrays``

Array keys: a constant's data is under the value's name; a large ndarray attribute is under
``"attr/<node name>/<attr name>[/<index>...]"`` (the index path into nested tuples/lists/dicts),
made unique with ``#<n>`` in the unlikely case that a constant bears the same name. The document
names every key it uses, so the reader never guesses.

Missing constant data (weight-stripped engines). ``from_document(..., weights="absent")`` accepts
constants whose key is not in ``arrays``: such a value's ``const`` is a *placeholder*, a zero-size
read-only array of the dtype the IR holds for its type (``is_missing(v.const)``), so ``v.is_const``,
the graph's text form and type-level passes and checks see a constant as before.
``missing_constants(graph)`` lists them; the caller fills them (``v.const = array``) before the
graph runs. With ``weights="required"`` (the default) a missing key is an error.

Every problem in a document is a ``ModelError`` naming the node, value or key and what was
expected: wrong schema, missing or mistyped key, unknown op or dtype, bad tag, dangling or doubly
defined value name, a constant array whose dtype or shape does not fit its declared type (the
dtype the IR holds for it, see ``held_dtypes``; its shape, or ``(1,)`` for a scalar, see
``shape_fits``). The graph is then checked by the IR verifier (types re-inferred, unless some
constant's data is missing). ``to_document`` refuses what ``from_document`` would refuse, and
``arrays`` holds the graph's own arrays (not copies).
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from typing import Any, Optional

import numpy as np

from rtxjit.errors import ModelError, RtxjitError
from rtxjit.ir.graph import Graph, Node, Value
from rtxjit.ir.registry import get_op
from rtxjit.ir.types import DType, TensorType

SCHEMA_VERSION = 1
INLINE_BYTES = 256  # ndarray attributes up to this size are written into the document itself
ATTR_PREFIX = "attr/"
WEIGHTS_MODES = ("required", "absent")

_NUMPY_NAMES = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                "float16", "float32", "float64")
_ML_DTYPES_NAMES = ("bfloat16", "float8_e4m3fn", "float8_e5m2", "int4", "uint4", "int2", "uint2")
_DEFAULT_NAN_BITS = struct.unpack("<Q", struct.pack("<d", float("nan")))[0]


# --- dtypes -------------------------------------------------------------------------------------

def numpy_dtype(name: str, where: str = "") -> np.dtype:
    """The numpy dtype named ``name``, from a fixed list (numeric numpy types and ml_dtypes' bf16
    and fp8 types); anything else (objects, strings, structured types) is a ModelError."""
    if isinstance(name, str):
        if name in _NUMPY_NAMES:
            return np.dtype(name)
        if name in _ML_DTYPES_NAMES:
            import ml_dtypes

            return np.dtype(getattr(ml_dtypes, name))
    raise ModelError(f"{where}: array dtype {name!r} is not supported; expected one of "
                     f"{list(_NUMPY_NAMES + _ML_DTYPES_NAMES)}")


def dtype_name(dtype: np.dtype, where: str = "") -> str:
    """The name of a supported numpy dtype (the inverse of ``numpy_dtype``)."""
    name = np.dtype(dtype).name
    numpy_dtype(name, where)
    if np.dtype(dtype).byteorder == ">":
        raise ModelError(f"{where}: big-endian arrays are not supported")
    return name


def held_dtypes(dtype: DType) -> tuple:
    """The numpy dtype names the IR holds a constant of ``dtype`` in, preferred first (bf16 data is
    held as float32 values, see the importer's ``tensor_to_array``; fp8 as ml_dtypes arrays)."""
    if dtype is DType.BF16:
        return "float32", "bfloat16"
    if dtype is DType.FP8E4M3:
        return ("float8_e4m3fn",)
    if dtype is DType.FP8E5M2:
        return ("float8_e5m2",)
    return (dtype.to_numpy().name,)


# --- placeholders for missing constant data -----------------------------------------------------

class MissingData(np.ndarray):
    """The zero-size placeholder ``const`` of a constant whose data was not loaded."""


def placeholder(dtype: DType) -> np.ndarray:
    a = np.empty(0, numpy_dtype(held_dtypes(dtype)[0])).view(MissingData)
    a.flags.writeable = False
    return a


def is_missing(array) -> bool:
    return isinstance(array, MissingData)


def missing_constants(graph: Graph) -> list:
    """Names of the constants of ``graph`` whose data is a placeholder, sorted."""
    return sorted(v.name for v in graph.constants() if is_missing(v.const))


# --- writing ------------------------------------------------------------------------------------

def _all_values(graph: Graph) -> list:
    """Every value once, in first-mention order (inputs, node inputs/outputs, outputs); two
    different values sharing a name are an error."""
    seen: dict = {}
    order = []

    def add(v, where: str):
        if v is None:
            return
        if not isinstance(v, Value):
            raise ModelError(f"{where}: expected a Value, got {type(v).__name__}")
        other = seen.get(v.name)
        if other is None:
            seen[v.name] = v
            order.append(v)
        elif other is not v:
            raise ModelError(f"{where}: two different values are named '{v.name}'")

    for v in graph.inputs:
        add(v, "graph input")
    for node in graph.nodes:
        for v in list(node.inputs) + list(node.outputs):
            add(v, f"node '{node.name}' ({node.op})")
    for v in graph.outputs:
        add(v, "graph output")
    return order


def shape_fits(array_shape, declared) -> bool:
    """Whether a constant's array shape fits its declared shape: equal, or ``(1,)`` for a declared
    scalar (numpy's ``ascontiguousarray`` makes 0-d arrays 1-d, and some passes hold such arrays;
    the array keeps its own shape through a round trip)."""
    array_shape, declared = tuple(array_shape), tuple(declared)
    return array_shape == declared or (declared == () and array_shape == (1,))


def _check_const(v: Value, array, where: str) -> None:
    """A constant's array must be one the IR holds for its declared type, of its shape."""
    if not isinstance(array, np.ndarray):
        raise ModelError(f"{where}: constant data of '{v.name}' must be a numpy array, got {type(array).__name__}")
    allowed = held_dtypes(v.type.dtype)
    if array.dtype.name not in allowed:
        raise ModelError(f"{where}: constant '{v.name}' is declared {v.type} but its array has dtype "
                         f"{array.dtype.name} (expected {' or '.join(allowed)})")
    if not shape_fits(array.shape, v.type.shape):
        raise ModelError(f"{where}: constant '{v.name}' is declared {v.type} but its array has shape "
                         f"{list(array.shape)}")


class _Writer:
    def __init__(self, taken: set):
        self.arrays: dict = {}
        self.taken = taken  # keys used by constants

    def key(self, base: str) -> str:
        key, n = base, 1
        while key in self.taken or key in self.arrays:
            key, n = f"{base}#{n}", n + 1
        return key

    def encode(self, v: Any, path: str) -> Any:
        t = type(v)
        if isinstance(v, np.generic):
            name = dtype_name(v.dtype, path)
            return {"$scalar": [name, np.asarray(v).tobytes().hex()]}
        if v is None or t in (bool, int, str):
            return v
        if t is float:
            if math.isfinite(v):
                return v
            if math.isnan(v):
                bits = struct.unpack("<Q", struct.pack("<d", v))[0]
                return {"$float": "nan" if bits == _DEFAULT_NAN_BITS else f"nan:{bits:016x}"}
            return {"$float": "inf" if v > 0 else "-inf"}
        if t is list:
            return [self.encode(x, f"{path}/{i}") for i, x in enumerate(v)]
        if t is tuple:
            return {"$tuple": [self.encode(x, f"{path}/{i}") for i, x in enumerate(v)]}
        if t is dict:
            return {"$dict": [[self.encode(k, f"{path}/{i}k"), self.encode(x, f"{path}/{i}")]
                              for i, (k, x) in enumerate(v.items())]}
        if t is bytes:
            return {"$bytes": base64.b64encode(v).decode("ascii")}
        if t is DType:
            return {"$dtype": v.short}
        if t is TensorType:
            return {"$type": [v.dtype.short, [_encode_dim(d, path) for d in v.shape]]}
        if isinstance(v, np.dtype):
            return {"$np_dtype": dtype_name(v, path)}
        if t is np.ndarray:
            name = dtype_name(v.dtype, path)
            shape = [int(d) for d in v.shape]
            if v.nbytes <= INLINE_BYTES:
                data = np.ascontiguousarray(v).tobytes()
                return {"$array": [name, shape, base64.b64encode(data).decode("ascii")]}
            key = self.key(ATTR_PREFIX + path)
            self.arrays[key] = v
            return {"$array_ref": [key, name, shape]}
        raise ModelError(f"attribute {path}: a value of type {t.__module__}.{t.__qualname__} cannot be "
                         "serialized (supported: None, bool, int, float, str, bytes, list, tuple, dict, "
                         "numpy arrays and scalars, DType, TensorType)")


def _encode_dim(d, where: str):
    if type(d) is int or type(d) is str:
        return d
    if isinstance(d, np.integer):
        return int(d)
    raise ModelError(f"{where}: a dimension must be an int or a symbol name, got {d!r}")


def to_document(graph: Graph) -> tuple:
    """``(doc, arrays)`` of ``graph``; see the module docstring for the layout."""
    values = _all_values(graph)
    arrays: dict = {}
    entries = []
    for v in values:
        entry = {"name": v.name, "dtype": v.type.dtype.short,
                 "shape": [_encode_dim(d, f"value '{v.name}'") for d in v.type.shape]}
        if v.is_const:
            if not is_missing(v.const):
                _check_const(v, v.const, "graph")
                arrays[v.name] = v.const
            entry["const"] = v.name
        entries.append(entry)
    writer = _Writer(set(arrays) | {v.name for v in values if v.is_const})
    nodes = []
    for node in graph.nodes:
        attrs = {}
        for k, a in node.attrs.items():
            if type(k) is not str:
                raise ModelError(f"node '{node.name}' ({node.op}): attribute name {k!r} is not a string")
            attrs[k] = writer.encode(a, f"{node.name}/{k}")
        nodes.append({"op": node.op, "name": node.name, "version": int(node.version),
                      "inputs": [None if v is None else v.name for v in node.inputs],
                      "outputs": [None if v is None else v.name for v in node.outputs],
                      "attrs": attrs})
    doc = {"schema": SCHEMA_VERSION, "name": graph.name, "opset": int(graph.opset),
           "inputs": [v.name for v in graph.inputs], "outputs": [v.name for v in graph.outputs],
           "values": entries, "nodes": nodes}
    arrays.update(writer.arrays)
    return doc, arrays


def encode_attr(value: Any, path: str = "attr") -> tuple:
    """``(json, arrays)`` of one attribute value in the tagged encoding (large arrays go to
    ``arrays`` under ``"attr/<path>..."``); the inverse of ``decode_attr``."""
    writer = _Writer(set())
    return writer.encode(value, path), writer.arrays


def decode_attr(data: Any, arrays: Optional[dict] = None, where: str = "attribute") -> Any:
    """The value that ``encode_attr`` encoded, of exactly the types it had."""
    return _Reader(arrays or {}).decode(data, where)


# --- reading ------------------------------------------------------------------------------------

def _field(obj, key: str, kind, where: str, optional: bool = False):
    if not isinstance(obj, dict):
        raise ModelError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if key not in obj:
        if optional:
            return None
        raise ModelError(f"{where}: missing key '{key}'")
    value = obj[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if type(value) not in kinds:
        names = " or ".join(k.__name__ for k in kinds)
        raise ModelError(f"{where}: key '{key}' must be {names}, got {type(value).__name__} {value!r:.60}")
    return value


def _decode_dim(d, where: str):
    if type(d) is int or type(d) is str:
        return d
    raise ModelError(f"{where}: a dimension must be an int or a symbol name, got {d!r:.60}")


def _dtype(short, where: str) -> DType:
    try:
        return DType.from_short(short)
    except (KeyError, TypeError):
        raise ModelError(f"{where}: unknown dtype {short!r:.60}; expected one of "
                         f"{[d.short for d in DType]}") from None


def _b64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise ModelError(f"{where}: expected base64 text, got {type(text).__name__}")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise ModelError(f"{where}: bad base64 data ({exc})") from None


def _shape(shape, where: str) -> tuple:
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise ModelError(f"{where}: an array shape must be a list of non-negative ints, got {shape!r:.60}")
    return tuple(shape)


def _tag_args(payload, n: int, tag: str, where: str) -> list:
    if not isinstance(payload, list) or len(payload) != n:
        raise ModelError(f"{where}: tag '{tag}' takes a list of {n} items, got {payload!r:.80}")
    return payload


class _Reader:
    def __init__(self, arrays: dict):
        self.arrays = arrays
        self.used: set = set()

    def decode(self, v: Any, where: str) -> Any:
        t = type(v)
        if v is None or t in (bool, int, float, str):
            return v
        if t is list:
            return [self.decode(x, where) for x in v]
        if t is not dict:
            raise ModelError(f"{where}: unexpected JSON value of type {t.__name__}")
        if len(v) != 1:
            raise ModelError(f"{where}: bad tag: a tagged value is an object with one '$' key, got keys "
                             f"{sorted(v)[:5]}")
        tag, p = next(iter(v.items()))
        if tag == "$tuple":
            if not isinstance(p, list):
                raise ModelError(f"{where}: tag '$tuple' takes a list")
            return tuple(self.decode(x, where) for x in p)
        if tag == "$dict":
            if not isinstance(p, list) or not all(isinstance(kv, list) and len(kv) == 2 for kv in p):
                raise ModelError(f"{where}: tag '$dict' takes a list of [key, value] pairs")
            out = {}
            for k, x in p:
                key = self.decode(k, where)
                try:
                    hash(key)
                except TypeError:
                    raise ModelError(f"{where}: dict key {key!r:.60} is not hashable") from None
                out[key] = self.decode(x, where)
            return out
        if tag == "$float":
            return _decode_float(p, where)
        if tag == "$bytes":
            return _b64(p, where)
        if tag == "$scalar":
            name, hexdata = _tag_args(p, 2, tag, where)
            dt = numpy_dtype(name, where)
            try:
                data = bytes.fromhex(hexdata) if isinstance(hexdata, str) else None
            except ValueError:
                data = None
            if data is None or len(data) != dt.itemsize:
                raise ModelError(f"{where}: tag '$scalar' of {name} needs {dt.itemsize} bytes as hex, got "
                                 f"{hexdata!r:.60}")
            return np.frombuffer(data, dt)[0].copy()
        if tag == "$dtype":
            return _dtype(p, where)
        if tag == "$type":
            short, dims = _tag_args(p, 2, tag, where)
            if not isinstance(dims, list):
                raise ModelError(f"{where}: tag '$type' needs a list of dims")
            return TensorType(_dtype(short, where), tuple(_decode_dim(d, where) for d in dims))
        if tag == "$np_dtype":
            return numpy_dtype(p, where)
        if tag == "$array":
            name, shape, data = _tag_args(p, 3, tag, where)
            dt, shape = numpy_dtype(name, where), _shape(shape, where)
            raw = _b64(data, where)
            if len(raw) != math.prod(shape) * dt.itemsize:
                raise ModelError(f"{where}: tag '$array' {name}{list(shape)} needs "
                                 f"{math.prod(shape) * dt.itemsize} bytes, got {len(raw)}")
            return np.frombuffer(raw, dt).reshape(shape).copy()
        if tag == "$array_ref":
            key, name, shape = _tag_args(p, 3, tag, where)
            dt, shape = numpy_dtype(name, where), _shape(shape, where)
            if not isinstance(key, str) or key not in self.arrays:
                raise ModelError(f"{where}: array '{key}' is missing from the arrays")
            a = self.arrays[key]
            if not isinstance(a, np.ndarray) or a.dtype != dt or tuple(a.shape) != shape:
                got = f"{a.dtype.name}{list(a.shape)}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ModelError(f"{where}: array '{key}' should be {name}{list(shape)}, got {got}")
            self.used.add(key)
            return a
        raise ModelError(f"{where}: bad tag {tag!r:.60}; expected one of $tuple, $dict, $float, $bytes, "
                         "$scalar, $dtype, $type, $np_dtype, $array, $array_ref")


def _decode_float(p, where: str) -> float:
    if p == "inf":
        return math.inf
    if p == "-inf":
        return -math.inf
    if p == "nan":
        return math.nan
    if isinstance(p, str) and p.startswith("nan:") and len(p) == 20:
        try:
            f = struct.unpack("<d", struct.pack("<Q", int(p[4:], 16)))[0]
        except ValueError:
            f = 0.0
        if math.isnan(f):
            return f
    raise ModelError(f"{where}: tag '$float' takes 'nan', 'inf', '-inf' or 'nan:<16 hex digits>', got {p!r:.60}")


def from_document(doc: dict, arrays: dict, weights: str = "required") -> Graph:
    """The graph that ``to_document`` described. ``arrays`` holds every key the document names;
    with ``weights="absent"`` a constant's data may be missing (it becomes a placeholder, see the
    module docstring). Errors are ModelErrors naming what does not fit."""
    if weights not in WEIGHTS_MODES:
        raise ModelError(f"weights={weights!r}: expected one of {list(WEIGHTS_MODES)}")
    if not isinstance(arrays, dict):
        raise ModelError(f"arrays must be a dict of key -> numpy array, got {type(arrays).__name__}")
    where = "graph document"
    schema = _field(doc, "schema", int, where)
    if schema != SCHEMA_VERSION:
        raise ModelError(f"{where}: schema version {schema}, this rtxjit reads version {SCHEMA_VERSION}")
    name = _field(doc, "name", str, where)
    opset = _field(doc, "opset", int, where)
    values, used = _read_values(_field(doc, "values", list, where), arrays, weights)
    defined = {n for n, v in values.items() if v.is_const}
    inputs = [_lookup(values, n, "graph input") for n in _field(doc, "inputs", list, where)]
    for v in inputs:
        if v.is_const:
            raise ModelError(f"graph input '{v.name}' is declared a constant")
        if v.name in defined:
            raise ModelError(f"graph input '{v.name}' is listed twice")
        defined.add(v.name)
    reader = _Reader(arrays)
    nodes = [_read_node(i, n, values, defined, reader) for i, n in enumerate(_field(doc, "nodes", list, where))]
    outputs = [_lookup(values, n, "graph output") for n in _field(doc, "outputs", list, where)]
    for v in outputs:
        if v.name not in defined:
            raise ModelError(f"graph output '{v.name}' is not a graph input, a constant or a node's output")
    mentioned = {v.name for v in inputs + outputs}
    for n in nodes:
        mentioned.update(v.name for v in n.inputs + n.outputs if v is not None)
    unused = [n for n in values if n not in mentioned]
    if unused:
        raise ModelError(f"{where}: values {unused[:5]} are declared but used nowhere")
    extra = sorted(set(arrays) - used - reader.used)
    if extra:
        raise ModelError(f"{where}: arrays {extra[:5]} are not named by the document")
    graph = Graph(name, inputs, outputs, nodes, opset)
    _verify(graph)
    return graph


def _lookup(values: dict, name, where: str) -> Value:
    if not isinstance(name, str):
        raise ModelError(f"{where}: expected a value name, got {name!r:.60}")
    v = values.get(name)
    if v is None:
        raise ModelError(f"{where} '{name}' is not declared in the document's values")
    return v


def _read_values(entries: list, arrays: dict, weights: str) -> tuple:
    """(name -> Value, the array keys the constants took)."""
    values: dict = {}
    used: set = set()
    for i, e in enumerate(entries):
        where = f"value #{i}"
        name = _field(e, "name", str, where)
        where = f"value '{name}'"
        if name in values:
            raise ModelError(f"{where} is declared twice")
        dtype = _dtype(_field(e, "dtype", str, where), where)
        shape = tuple(_decode_dim(d, where) for d in _field(e, "shape", list, where))
        v = Value(name, TensorType(dtype, shape))
        key = _field(e, "const", str, where, optional=True)
        if key is not None:
            if key in arrays:
                _check_const(v, arrays[key], f"array '{key}'")
                v.const = arrays[key]
                used.add(key)
            elif weights == "absent":
                v.const = placeholder(dtype)
            else:
                raise ModelError(f"{where}: the data of this constant (array '{key}') is missing")
        unknown = set(e) - {"name", "dtype", "shape", "const"}
        if unknown:
            raise ModelError(f"{where}: unknown keys {sorted(unknown)}")
        values[name] = v
    return values, used


def _read_node(index: int, entry: dict, values: dict, defined: set, reader: _Reader) -> Node:
    name = _field(entry, "name", str, f"node #{index}")
    op = _field(entry, "op", str, f"node '{name}'")
    where = f"node '{name}' ({op})"
    version = _field(entry, "version", int, where)
    try:
        get_op(op, where, version)  # the op, in a version this rtxjit declares
    except RtxjitError as exc:
        raise ModelError(str(exc)) from None
    ins, outs = [], []
    for n in _field(entry, "inputs", list, where):
        if n is None:
            ins.append(None)
            continue
        v = _lookup(values, n, f"{where}: input")
        if v.name not in defined:
            raise ModelError(f"{where}: input '{v.name}' is not a graph input, a constant or the output of "
                             "an earlier node")
        ins.append(v)
    for n in _field(entry, "outputs", list, where):
        if n is None:
            outs.append(None)
            continue
        v = _lookup(values, n, f"{where}: output")
        if v.is_const:
            raise ModelError(f"{where}: output '{v.name}' is declared a constant")
        if v.name in defined:
            raise ModelError(f"{where}: output '{v.name}' is already defined (a duplicate output)")
        defined.add(v.name)
        outs.append(v)
    raw = _field(entry, "attrs", dict, where)
    attrs = {k: reader.decode(a, f"{where}: attribute '{k}'") for k, a in raw.items()}
    unknown = set(entry) - {"op", "name", "version", "inputs", "outputs", "attrs"}
    if unknown:
        raise ModelError(f"{where}: unknown keys {sorted(unknown)}")
    node = Node(op, name, ins, outs, attrs, version)
    for v in outs:
        if v is not None:
            v.producer = node
    return node


def _verify(graph: Graph) -> None:
    """The IR verifier; types are re-inferred unless some constant's data is missing."""
    from rtxjit.ir.verify import verify

    try:
        verify(graph, check_types=not missing_constants(graph))
    except RtxjitError as exc:
        raise ModelError(f"graph document: {exc}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
        raise ModelError(f"graph document: type inference failed: {type(exc).__name__}: {exc}") from None
