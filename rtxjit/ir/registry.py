"""The op registry: each op (each ONNX version that changed its meaning) is declared once, with its
type and shape inference, its float64 numpy reference and its lowering onto a kernel kind.

```python
@op("Softmax", since=13, kind=Kind.ROW)
def softmax(x: TensorType, *, axis: int = -1) -> TensorType:   # inference; kwargs = attributes
    return x

@softmax.reference
def _(x, *, axis=-1): ...

@softmax.lower
def _(ctx, x, *, axis=-1): ...
```

Versions. ``since`` is the ONNX version whose semantics a declaration implements; an op whose
meaning changed (GroupNormalization 18 -> 21) is declared once per meaning, each ``@op`` with its own
``since``, in the op's one file. A node resolves to the newest declaration not above its version
(``get_op(name, where, version)``): the importer gives each node the version of the op's ONNX schema
at the model's opset (at a function body's own opset inside an expanded body) and keeps it in
``Node.version``, which serialization stores, so every later stage resolves the same declaration.
A node older than every declaration is expanded from its ONNX function body by the importer, or
refused. A version of 0 (a node made without one) resolves to the newest declaration.

Domains. An op of another ONNX domain than the default one is declared with ``domain=``; it is
keyed by ``(domain, name)``, held under its qualified name ``"<domain>.<name>"`` (``qualified``), which
is what ``Node.op``, ``get_op`` and serialized graphs carry (rtxjit's own fused ops are the domain
"rtxjit": ``"rtxjit.Attention"``). ``since`` counts in that domain's versions, and a node resolves at
the version the model imports the domain at (its ``opset_import``; the newest declaration where the
model does not import it)::

    @op("MatMulNBits", since=1, kind=Kind.MATMUL, domain="com.microsoft")   # rtxjit/ops/contrib.py
    def matmul_nbits(a: TensorType, b: TensorType, scales: TensorType, *, K: int, N: int, ...):

Users register ops of their own domains at run time with ``rtxjit.register_op`` (rtxjit/custom.py),
which declares them here with a ``fingerprint`` (a hash of their code, part of cache keys);
``all_ops`` and ``all_op_versions`` list rtxjit's own ops only.

Keyword-only parameters of the inference function are the op's attributes, with their ONNX
defaults; one without a default is a required attribute. A parameter named ``_outputs`` receives the
node's number of outputs. Inputs listed in ``host_inputs`` are needed on the host (shape tensors, as
in TensorRT): inference gets their value as a numpy array, or ``Unknown`` where it is not known yet.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from rtxjit.errors import InternalError, ModelError, UnsupportedOpError
from rtxjit.ir.types import TensorType


class Kind(enum.Enum):
    POINTWISE = "pointwise"
    ROW = "row_reduce"
    MATMUL = "matmul"
    CONV = "conv"
    POOL = "pool"
    ATTENTION = "attention"
    MOVEMENT = "data_movement"
    ALIAS = "alias"  # output is a view of an input: no data is computed or moved
    SHAPE = "shape"  # computed on the host from types and host values only
    CUSTOM = "custom"  # a user's op, lowered onto the user's Triton kernel (rtxjit/custom.py)


DEFAULT_DOMAINS = ("", "ai.onnx")


def qualified(domain: str, name: str) -> str:
    """The registry's name of op ``name`` of ONNX ``domain``: ``name`` itself in the default domain,
    ``"<domain>.<name>"`` in any other (ONNX op names hold no dots, so ``split_name`` undoes it)."""
    return name if domain in DEFAULT_DOMAINS else f"{domain}.{name}"


def split_name(name: str) -> tuple:
    """``(domain, op name)`` of a registry name ("" for the default domain)."""
    domain, _, op_type = name.rpartition(".")
    return domain, op_type


@dataclass(frozen=True)
class Unknown:
    """A host input whose value is not known yet (at import, before shapes are bound)."""

    type: TensorType


def known(v) -> bool:
    return isinstance(v, np.ndarray)


@dataclass(frozen=True)
class Rand:
    """A random test input. ``dtype=None`` means the float dtype under test."""

    shape: tuple
    dtype: Optional[str] = None
    low: float = -2.0
    high: float = 2.0


@dataclass
class Sample:
    """One test case of an op: inputs are ``Rand`` specs, fixed numpy arrays, or None (omitted)."""

    inputs: list
    attrs: dict = field(default_factory=dict)
    outputs: int = 1
    float_types: tuple = ("fp32", "fp16")
    opset: Optional[int] = None  # the test model's opset, where the op needs a newer one than the default


_MISSING = object()


class OpDef:
    def __init__(self, name: str, since: int, kind: Kind, infer: Callable, host_inputs=(),
                 samples=(), tolerance: Optional[dict] = None, fingerprint: Optional[str] = None):
        self.name = name  # qualified: "<domain>.<op>" outside the default domain
        self.domain, self.op_type = split_name(name)
        self.fingerprint = fingerprint  # a user-registered op's code hash (rtxjit/custom.py); None: rtxjit's
        self.since = since
        self.kind = kind
        self.infer_fn = infer
        self.host_inputs = tuple(host_inputs)
        self.samples = list(samples)
        self.tolerance = tolerance or {}
        self.reference_fn: Optional[Callable] = None
        self.lower_fn: Optional[Callable] = None
        self.expr_fn: Optional[Callable] = None
        self.attr_defaults: dict = {}
        self.wants_outputs = False
        for p in inspect.signature(infer).parameters.values():
            if p.kind is not p.KEYWORD_ONLY:
                continue
            if p.name == "_outputs":
                self.wants_outputs = True
            else:
                self.attr_defaults[p.name] = _MISSING if p.default is p.empty else p.default

    def reference(self, fn: Callable) -> Callable:
        self.reference_fn = fn
        return fn

    def lower(self, fn: Callable) -> Callable:
        self.lower_fn = fn
        return fn

    def expr(self, fn: Callable) -> Callable:
        """A pointwise op's Triton expression: ``fn(in_dtypes, out_dtype, attrs) -> (expr, scalars)``
        over inputs ``x0, x1, ...`` (in compute types; an omitted optional input's dtype is None, and
        it takes no ``x`` name) and scalar arguments ``s0, s1, ...``. Declaring it gives the op its
        lowering onto the pointwise template, and makes it fusable (rtxjit/passes/fuse_pointwise.py)."""
        self.expr_fn = fn
        self.lower_fn = self._lower_expr
        return fn

    def _lower_expr(self, ctx, *xs, **attrs) -> None:
        given = [x for x in xs if x is not None]
        dtypes = [None if x is None else x.dtype for x in xs]
        expr, scalars = self.expr_fn(dtypes, ctx.outputs[0].dtype, attrs)
        out = ctx.pointwise_output(given)
        ctx.pointwise(expr, given, out, tuple(scalars))
        if out is not ctx.outputs[0]:
            ctx.alias(0, out)

    def bind_attrs(self, attrs: dict, where: str) -> dict:
        """The node's attributes completed with defaults; an unknown or missing one is an error."""
        for k in attrs:
            if k not in self.attr_defaults:
                raise UnsupportedOpError(f"{where}: attribute '{k}' of {self.name} is not supported")
        out = {}
        for k, default in self.attr_defaults.items():
            if k in attrs:
                out[k] = attrs[k]
            elif default is _MISSING:
                raise ModelError(f"{where}: {self.name} needs attribute '{k}'")
            else:
                out[k] = default
        return out

    def infer(self, inputs: list, attrs: dict, n_outputs: int) -> tuple:
        extra = {"_outputs": n_outputs} if self.wants_outputs else {}
        out = self.infer_fn(*inputs, **attrs, **extra)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def run_reference(self, values: list, attrs: dict, n_outputs: int) -> tuple:
        """The float64 reference (also how constants fold and host values are computed). numpy's
        warnings about non-finite values (a -inf mask cast, 0 / 0) stay inside: the result carries
        them as ONNX says, and they are not the user's business."""
        extra = {"_outputs": n_outputs} if self.wants_outputs else {}
        with np.errstate(all="ignore"):
            out = self.reference_fn(*values, **attrs, **extra)
        return tuple(out) if isinstance(out, (tuple, list)) else (out,)

    def __repr__(self) -> str:
        return f"OpDef({self.name}, since={self.since}, kind={self.kind.value})"


_VERSIONS: dict = {}  # qualified op name -> [OpDef], oldest version first


def op(name: str, since: int, kind: Kind, host_inputs=(), samples=(), tolerance=None, domain: str = ""):
    """Declare op ``name`` of ONNX ``domain`` ("" = the default domain) from version ``since``."""
    def deco(fn: Callable) -> OpDef:
        return declare(OpDef(qualified(domain, name), since, kind, fn, host_inputs, samples, tolerance))

    return deco


def declare(d: OpDef, replace: bool = False) -> OpDef:
    """Add declaration ``d``; one of the same name and version already there is an error, unless
    ``replace`` (a user re-registering a changed op)."""
    versions = _VERSIONS.setdefault(d.name, [])
    same = [v for v in versions if v.since == d.since]
    if same and not replace:
        raise InternalError(f"op {d.name} version {d.since} is declared twice")
    versions[:] = sorted([v for v in versions if v.since != d.since] + [d], key=lambda v: v.since)
    return d


def undeclare(name: str, since: int) -> bool:
    """Remove the declaration of ``name`` at version ``since``; whether there was one."""
    versions = _VERSIONS.get(name, [])
    kept = [v for v in versions if v.since != since]
    if len(kept) == len(versions):
        return False
    if kept:
        _VERSIONS[name] = kept
    else:
        del _VERSIONS[name]
    return True


def get_op(name: str, where: str = "", version: int = 0) -> OpDef:
    """The declaration of op ``name`` that a node of ONNX version ``version`` runs: the newest one
    not above it (the newest of all where ``version`` is 0)."""
    versions = _VERSIONS.get(name)
    if not versions:
        domain, op_type = split_name(name)
        if domain and domain != "rtxjit":
            raise UnsupportedOpError(f"{where}: op '{op_type}' of domain '{domain}' is not registered: domain "
                                     f"'{domain}' is not supported by rtxjit unless its ops are registered with "
                                     f"rtxjit.register_op('{domain}', '{op_type}', ...) before the model is "
                                     "imported or an engine holding it is loaded")
        raise UnsupportedOpError(f"{where}: op {name} is not supported by rtxjit")
    if not version:
        return versions[-1]
    for d in reversed(versions):
        if d.since <= version:
            return d
    raise UnsupportedOpError(f"{where}: {name} version {version} is not supported "
                             f"(rtxjit implements it from version {versions[0].since})")


def op_versions(name: str) -> list:
    """Every declaration of op ``name``, oldest first (empty if rtxjit lacks the op)."""
    return list(_VERSIONS.get(name, ()))


def all_ops() -> dict:
    """Op name -> its newest declaration, for every op of rtxjit (see ``all_op_versions`` for the
    others; ``custom_ops`` for the users')."""
    return {name: versions[-1] for name, versions in _VERSIONS.items() if versions[-1].fingerprint is None}


def all_op_versions() -> list:
    """Every declaration of every op of rtxjit, by name then version."""
    return [d for name in sorted(_VERSIONS) for d in _VERSIONS[name] if d.fingerprint is None]


def custom_ops() -> list:
    """Every user-registered declaration (rtxjit.register_op), by name then version."""
    return [d for name in sorted(_VERSIONS) for d in _VERSIONS[name] if d.fingerprint is not None]
