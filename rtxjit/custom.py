"""Custom ops: an op of the user's own ONNX domain, run by the user's ``@triton.jit`` kernel.

```python
rtxjit.register_op(
    "my.ops", "Swish", version=1,
    infer=lambda x, *, alpha=1.0: x,                       # output type(s) from input types
    reference=lambda x, *, alpha=1.0: x / (1 + np.exp(-alpha * x)),   # float64 numpy
    kernel=swish_kernel,                                    # @triton.jit
    grid=lambda x, y, *, alpha=1.0: (triton.cdiv(x.numel, 256),),
    args=lambda x, y, *, alpha=1.0: (x.numel, alpha),
    meta={"BLOCK": 256},
)
```

The launch is what a Triton user writes by hand, ``kernel[grid](*input pointers, *output pointers,
*args, **meta)``: every input and output as a pointer to contiguous data (a strided input is copied
first), then the ``args`` scalars, then the ``meta`` constexprs by name. ``grid``, ``args`` and
``meta`` (a dict, or a function like the others) get a ``TensorInfo`` (shape, dtype, numel) per
input then per output, and the node's attributes as keywords. The inference's keyword-only
parameters are the op's attributes with their defaults (as for every op, rtxjit/ir/registry.py).

Why one call with every part rather than a decorator per part (as rtxjit's own ops are declared):
the registration is checked whole when it is made (the kernel's parameters against ``meta``, the
hooks against the attributes), so an op never exists half-declared, and a mistake is reported at
the line that registers it, not at the first run.

How it runs. The op is declared in the registry as ``"<domain>.<name>"`` (``Kind.CUSTOM``); a node
of that domain resolves to it at the version the model imports the domain at. Its lowering renders
one kernel source: a small wrapper taking rtxjit's ``(pointer, offset)`` pairs, followed by the
user's kernel source (read with ``inspect``), so the user's kernel goes through the same road as a
generated one: the interpreter on the CPU, the compiler, the runtime cache, AOT engine builds. The
kernel's source text is part of every kernel key, so a changed kernel is never served from a cache;
the op's ``fingerprint`` (a hash of the kernel's and the hooks' sources) is part of the optimized
graph's key (cache/keys.compiler_version) and is recorded in engines (a changed op is warned about
at load; a missing one is an EngineError naming it).

The kernel must be self-contained: besides its parameters it may name only ``triton``, ``tl``
(triton.language) and ``libdevice``, as rtxjit's generated kernels do (the source is compiled in a
namespace of its own, where the user's module globals and helper functions do not exist).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import textwrap
from dataclasses import dataclass
from typing import Callable, Optional, Union

from rtxjit.codegen.source import KernelSource, render
from rtxjit.errors import UnsupportedOpError, UsageError
from rtxjit.ir.registry import DEFAULT_DOMAINS, Kind, OpDef, declare, op_versions, qualified, undeclare

RESERVED_DOMAINS = DEFAULT_DOMAINS + ("rtxjit",)
_MODULES = {"triton": "triton", "tl": "triton.language", "libdevice": "triton.language.extra.libdevice"}


@dataclass(frozen=True)
class TensorInfo:
    """What the launch hooks know of an input or output: its shape, dtype ("fp32", "fp16", "int64",
    ...: ``rtxjit.ir.types.DType.short``) and number of elements."""

    shape: tuple
    dtype: str
    numel: int


@dataclass(frozen=True)
class _Kernel:
    name: str
    source: str  # the function's source from its ``def`` line, decorators removed
    runtime: tuple  # parameter names that are not constexpr, in order
    constexprs: tuple  # constexpr parameter names


def register_op(domain: str, name: str, *, infer: Callable, reference: Callable, kernel,
                grid: Callable, args: Optional[Callable] = None, meta: Union[dict, Callable, None] = None,
                version: int = 1, replace: bool = False) -> OpDef:
    """Register op ``name`` of ONNX ``domain`` from domain version ``version`` (see the module
    docstring). ``replace`` replaces an earlier registration of the same op and version (a changed
    kernel in a notebook); without it a second registration is a UsageError. Returns the registry's
    declaration."""
    where = f"register_op('{domain}', '{name}')"
    if isinstance(domain, str) and (domain in RESERVED_DOMAINS or domain.startswith(("ai.onnx.", "rtxjit."))):
        raise UsageError(f"{where}: domain '{domain}' is reserved (ONNX's or rtxjit's own); "
                         "use a domain of your own, such as 'my.ops'")
    if not isinstance(domain, str) or not re.fullmatch(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)*", domain):
        raise UsageError(f"{where}: the domain must be a dotted name such as 'my.ops', got {domain!r}")
    if not isinstance(name, str) or not name.isidentifier():
        raise UsageError(f"{where}: the op name must be an identifier, got {name!r}")
    if type(version) is not int or version < 1:
        raise UsageError(f"{where}: version must be an int >= 1, got {version!r}")
    where = f"register_op('{domain}', '{name}', version={version})"
    full = qualified(domain, name)
    if not replace and any(d.since == version for d in op_versions(full)):
        raise UsageError(f"{where}: op '{name}' of domain '{domain}' version {version} is already registered "
                         "(pass replace=True to replace it)")
    attrs = _attributes(infer, where)
    _check_hook(reference, "reference", attrs, where)
    _check_hook(grid, "grid", attrs, where)
    if args is not None:
        _check_hook(args, "args", attrs, where)
    if callable(meta):
        _check_hook(meta, "meta", attrs, where)
    elif meta is not None and not isinstance(meta, dict):
        raise UsageError(f"{where}: meta must be a dict of constexpr values or a function, got {type(meta).__name__}")
    k = _kernel(kernel, where)
    if isinstance(meta, dict):
        _check_meta(meta, k, where)
    wrapper = "rtxjit_" + re.sub(r"\W", "_", full)
    if k.name == wrapper:
        raise UsageError(f"{where}: rename the kernel: '{wrapper}' is the name of rtxjit's wrapper")
    fingerprint = _fingerprint(full, version, k, [infer, reference, grid, args, meta])

    d = OpDef(full, version, Kind.CUSTOM, infer, fingerprint=fingerprint)
    d.reference(reference)
    sources: dict = {}  # (inputs, outputs, args) -> KernelSource; the meta names are the kernel's

    @d.lower
    def _(ctx, *xs, **attrs_):
        _launch(ctx, d, k, wrapper, sources, xs, attrs_, grid, args, meta)

    return declare(d, replace=True)


def unregister_op(domain: str, name: str, version: Optional[int] = None) -> None:
    """Remove a registration (every version of the op where ``version`` is None)."""
    full = qualified(domain, name)
    found = [d for d in op_versions(full) if d.fingerprint is not None and version in (None, d.since)]
    if not found:
        raise UsageError(f"unregister_op: op '{name}' of domain '{domain}'"
                         f"{'' if version is None else f' version {version}'} is not registered")
    for d in found:
        undeclare(full, d.since)


# --- checks at registration ------------------------------------------------------------------------

def _parameters(fn, what: str, where: str, expected: str = "a function"):
    """``fn``'s parameters, or a UsageError naming the hook."""
    if not callable(fn):
        raise UsageError(f"{where}: {what} must be {expected}, got {type(fn).__name__}")
    try:
        return inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{where}: {what} has no readable signature: {exc}") from None


def _attributes(infer, where: str) -> list:
    params = _parameters(infer, "infer", where, "a function of the input types")
    if any(p.kind is p.VAR_KEYWORD for p in params):
        raise UsageError(f"{where}: infer takes **{[p.name for p in params if p.kind is p.VAR_KEYWORD][0]}; "
                         "name each attribute as a keyword-only parameter with its default")
    return [p.name for p in params if p.kind is p.KEYWORD_ONLY and p.name != "_outputs"]


def _check_hook(fn, what: str, attrs: list, where: str) -> None:
    params = _parameters(fn, what, where)
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    lacking = [a for a in attrs if a not in names]
    if lacking:
        raise UsageError(f"{where}: {what} does not take attribute(s) {lacking} as keywords "
                         f"(infer declares {attrs})")


def _kernel(kernel, where: str) -> _Kernel:
    # triton is imported here, not at the top: rtxjit/__init__ sets the interpreter up before any
    # triton import, and the registry's op families need no triton at all
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    jitted = isinstance(kernel, (JITFunction, InterpretedFunction))
    if not jitted or not inspect.isfunction(getattr(kernel, "fn", None)):
        raise UsageError(f"{where}: kernel must be a @triton.jit function, got {type(kernel).__name__}")
    fn = kernel.fn
    try:
        text = textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError) as exc:
        raise UsageError(f"{where}: the source of kernel {fn.__name__} cannot be read ({exc}); "
                         "define it in a Python file") from None
    start = re.search(r"^def\s+\w+\s*\(", text, re.M)
    if start is None:
        raise UsageError(f"{where}: kernel {fn.__name__}: no 'def' line in its source")
    refs = inspect.getclosurevars(fn)
    if refs.nonlocals:
        raise UsageError(f"{where}: kernel {fn.__name__} uses variables of an enclosing function "
                         f"{sorted(refs.nonlocals)}; custom kernels must be self-contained")
    bad = [n for n, v in refs.globals.items()
           if n not in _MODULES or getattr(v, "__name__", None) != _MODULES[n]]
    if bad:
        raise UsageError(f"{where}: kernel {fn.__name__} refers to global(s) {sorted(bad)}; a custom kernel may "
                         "name only triton, tl (triton.language) and libdevice besides its parameters "
                         "(inline helpers and constants, or pass them as args/meta)")
    runtime, constexprs = [], []
    for p in inspect.signature(fn).parameters.values():
        if p.kind is not p.POSITIONAL_OR_KEYWORD:
            raise UsageError(f"{where}: kernel {fn.__name__}: parameter '{p.name}' must be a plain parameter "
                             "(no *args, **kwargs or keyword-only parameters)")
        ann = p.annotation
        is_const = "constexpr" in (ann if isinstance(ann, str) else getattr(ann, "__name__", repr(ann)))
        (constexprs if is_const else runtime).append(p.name)
    return _Kernel(fn.__name__, text[start.start():].rstrip() + "\n", tuple(runtime), tuple(constexprs))


def _check_meta(meta: dict, k: _Kernel, where: str) -> None:
    if set(meta) != set(k.constexprs):
        raise UsageError(f"{where}: meta gives {sorted(meta)}, but kernel {k.name}'s constexpr parameters are "
                         f"{sorted(k.constexprs)} (meta must give each of them a value)")
    for key, value in meta.items():
        if type(value) not in (int, float, bool):
            raise UsageError(f"{where}: meta['{key}'] must be an int, float or bool, got {type(value).__name__}")


def _code(fn) -> str:
    if fn is None or isinstance(fn, dict):
        return json.dumps(fn, sort_keys=True)
    try:
        return inspect.getsource(fn)
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        return repr(fn) if code is None else code.co_code.hex() + repr(code.co_consts)


def _fingerprint(full: str, version: int, k: _Kernel, hooks: list) -> str:
    h = hashlib.sha256(json.dumps([full, version, k.source]).encode())
    for fn in hooks:
        h.update(b"\0" + _code(fn).encode())
    return h.hexdigest()


# --- lowering --------------------------------------------------------------------------------------

def _launch(ctx, d: OpDef, k: _Kernel, wrapper: str, sources: dict, xs: tuple, attrs: dict,
            grid, args, meta) -> None:
    where = f"{ctx.where}, custom op {d.domain}::{d.op_type} (kernel {k.name})"
    if any(x is None for x in xs):
        raise UnsupportedOpError(f"{where}: an omitted optional input is not supported for custom ops")
    ins = [ctx.contiguous(x) for x in xs]
    outs = [o if o is not None else ctx.temp(t.dtype, t.shape) for o, t in zip(ctx.outputs, ctx.out_types)]
    infos = [TensorInfo(tuple(int(s) for s in v.shape), v.dtype.short, int(v.numel)) for v in ins + outs]
    try:
        g = tuple(grid(*infos, **attrs))
        extra = tuple(args(*infos, **attrs)) if args is not None else ()
        cx = dict(meta(*infos, **attrs) if callable(meta) else (meta or {}))
    except (TypeError, ValueError, IndexError, KeyError, ZeroDivisionError) as exc:
        raise UsageError(f"{where}: its launch hooks failed: {type(exc).__name__}: {exc}") from exc
    if not 1 <= len(g) <= 3 or any(type(n) is not int or n < 0 for n in g):
        raise UsageError(f"{where}: grid must be 1 to 3 non-negative ints, got {g!r}")
    if any(type(a) not in (int, float, bool) for a in extra):
        raise UsageError(f"{where}: args must be ints, floats or bools, got {extra!r}")
    _check_meta(cx, k, where)
    expected = len(ins) + len(outs) + len(extra)
    if expected != len(k.runtime):
        raise UsageError(f"{where}: the kernel takes {len(k.runtime)} non-constexpr parameters {list(k.runtime)}, "
                         f"but the node gives {len(ins)} input pointer(s) + {len(outs)} output pointer(s) + "
                         f"{len(extra)} args = {expected}")
    key = (len(ins), len(outs), len(extra))
    src = sources.get(key)
    if src is None:
        src = sources[key] = _render(d, k, wrapper, *key)
    launch_args: list = []
    for v in ins + outs:
        launch_args += [ctx.ptr(v), v.offset]
    launch_args += list(extra)
    ctx.launch(src, g, launch_args, **{f"c_{n}": v for n, v in cx.items()})


def _render(d: OpDef, k: _Kernel, wrapper: str, n_in: int, n_out: int, n_args: int) -> KernelSource:
    """The wrapper (rtxjit's pointer + offset pairs -> the kernel's pointers) then the kernel. The
    wrapper comes first: ``codegen.source.parameters`` finds its ``def`` line before any of the
    user's text."""
    pairs = [f"i{j}" for j in range(n_in)] + [f"o{j}" for j in range(n_out)]
    params = [p for name in pairs for p in (f"{name}_ptr", f"{name}_off")]
    params += [f"a{j}" for j in range(n_args)] + [f"c_{n}: tl.constexpr" for n in k.constexprs]
    call = [f"{name}_ptr + {name}_off" for name in pairs] + [f"a{j}" for j in range(n_args)]
    call += [f"{n}=c_{n}" for n in k.constexprs]
    body = (f"def {wrapper}({', '.join(params)}):\n"
            f"    {k.name}({', '.join(call)})\n\n\n"
            f"@triton.jit\n{k.source}")
    header = f"custom op {d.domain}::{d.op_type} version {d.since}, kernel {k.name}, {n_in} in, {n_out} out"
    return render(wrapper, header, body)
