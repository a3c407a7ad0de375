"""Generated kernel source: deterministic text, its hash, and turning it into a Triton kernel.

The text is the cache key's main part, so it holds no ids, addresses or node names: the same
template, parameters and dtypes always give the same bytes. Kernels are created in memory from the
text that was just generated (never from stored text); the source is registered with ``linecache``
so Triton can read it back, as it does for functions defined in files.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import linecache
import re
import threading
from dataclasses import dataclass

from rtxjit.errors import InternalError

PRELUDE = "import triton\nimport triton.language as tl\nfrom triton.language.extra import libdevice\n\n\n"


@dataclass(frozen=True)
class KernelSource:
    name: str  # the Python function name inside ``text``
    text: str

    @functools.cached_property
    def key(self) -> str:  # computed once per object: planning a binding asks it per launch
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def short_key(self) -> str:
        return self.key[:12]


def render(name: str, header: str, body: str) -> KernelSource:
    text = f"# rtxjit kernel {name}: {header}\n" + PRELUDE + body.strip("\n") + "\n"
    return KernelSource(name, text)


def memoized(render):
    """A template's ``render_*`` function, memoized on its arguments: planning a new binding renders
    the same sources again (their dynamic sizes are arguments), and a source object computes its
    key once. A render function so marked reads nothing but its arguments. The cache key keeps
    every value's type, nested ones too (``1``, ``1.0`` and ``True`` are equal in Python but
    render differently); a call with an unhashable argument is rendered afresh."""
    cache: dict = {}

    @functools.wraps(render)
    def wrapper(*args, **kwargs):
        try:
            key = _typed_key((args, tuple(sorted(kwargs.items()))))
            hit = cache.get(key)
        except TypeError:  # an unhashable argument
            return render(*args, **kwargs)
        if hit is None:
            hit = render(*args, **kwargs)
            if len(cache) >= MEMO_LIMIT:
                cache.clear()
            cache[key] = hit
        return hit

    wrapper.cache_clear = cache.clear
    return wrapper


MEMO_LIMIT = 4096  # rendered sources kept per template function


def typed_key(value):
    """The memo key of ``value`` (see ``memoized``): its value with every nested value's type."""
    return _typed_key(value)


def _typed_key(value):
    memo = getattr(value, "memo_key", None)  # an argument that computes (and keeps) its own key
    if memo is not None and not isinstance(value, type):
        return memo
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_typed_key(v) for v in value))
    if isinstance(value, frozenset):
        return ("frozenset", frozenset(_typed_key(v) for v in value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return (type(value), tuple(_typed_key(getattr(value, f.name)) for f in dataclasses.fields(value)))
    hash(value)
    return (type(value), value)


_DEF_RE = re.compile(r"^def (\w+)\((.*?)\):$", re.M | re.S)


@functools.lru_cache(maxsize=8192)
def parameters(src: KernelSource) -> tuple:
    """``((name, is_constexpr), ...)`` of the kernel function's parameters, in order (parsed once
    per source: planning and launching ask it per launch)."""
    return tuple(_parameters(src))


def _parameters(src: KernelSource) -> list:
    for m in _DEF_RE.finditer(src.text):
        if m.group(1) == src.name:
            return [(p.split(":")[0].strip(), "constexpr" in p) for p in m.group(2).split(",") if p.strip()]
    raise InternalError(f"kernel {src.name}: no 'def {src.name}(...)' line in its source")


def specialize(src: KernelSource, names) -> KernelSource:
    """``src`` with the parameters ``names`` made ``tl.constexpr``: Triton then compiles the kernel
    for their values (loop bounds, strides and sizes folded in). Deterministic: the same source and
    names give the same text and key. Parameters that are constexprs already are left as they are
    (and not named again); with none left to change, ``src`` itself is returned."""
    names = set(names) - {name for name, const in parameters(src) if const}
    if not names:
        return src
    return KernelSource(src.name, _constexprs(src, names, f"# specialized: {', '.join(sorted(names))}"))


def with_static(src: KernelSource, values: dict) -> KernelSource:
    """``src`` with the parameters in ``values`` (name -> int) made ``tl.constexpr`` and their values
    written in a ``# static:`` line: the source of a shape-generic (fallback) kernel whose sizes that
    are the same for every binding of the model are compiled in (plan/statics.py). The values are
    part of the text, so the source's key tells two launches with different static sizes apart,
    although Triton receives the values as arguments. Deterministic: sorted names."""
    if not values:
        return src
    return _with_static(src, tuple(sorted((name, int(v)) for name, v in values.items())))


@functools.lru_cache(maxsize=8192)
def _with_static(src: KernelSource, values: tuple) -> KernelSource:
    """``with_static`` once per source and values: every binding's plan asks it per launch."""
    note = "# static: " + ", ".join(f"{name}={v}" for name, v in values)
    return KernelSource(src.name, _constexprs(src, {name for name, _ in values}, note))


def _constexprs(src: KernelSource, names: set, note: str) -> str:
    """``src``'s text with ``names`` annotated ``tl.constexpr`` and ``note`` as its second line."""
    m = next(m for m in _DEF_RE.finditer(src.text) if m.group(1) == src.name)
    params = []
    for p in m.group(2).split(","):
        name = p.split(":")[0].strip()
        params.append(f"{name}: tl.constexpr" if name in names and ":" not in p else p.strip())
    head = f"def {src.name}({', '.join(params)}):"
    text = src.text[:m.start()] + head + src.text[m.end():]
    return text.replace("\n", f"\n{note}\n", 1)


_lock = threading.Lock()
_loaded: dict = {}


def is_loaded(src: KernelSource, interpret: bool, generic: bool = False) -> bool:
    return (src.key, interpret, generic and not interpret) in _loaded


def load_kernel(src: KernelSource, interpret: bool, generic: bool = False):
    """The Triton kernel for ``src``: a JITFunction, or an InterpretedFunction for the CPU.

    ``generic`` compiles one binary for every value of the run-time sizes and strides: Triton
    specializes none of them (no divisibility or value-1 specialization), so a new shape never
    compiles again. Buffer pointers (``*_ptr``: 16-byte aligned, as every buffer rtxjit allocates
    is and as direct launches check of feeds) and the views' offsets into them (the parameter right
    after each pointer, as ``kernels.keys.arg_classes`` classes it: the same in every binding but
    where a view starts at a dynamic size) keep Triton's specialization: with
    it the fallback's loads vectorize (measured on an H100 before, fully generic: bert-base fallback
    steps 3.5-3.9x the specialized ones, resnet50 2.8-3.2x)."""
    cache_key = (src.key, interpret, generic and not interpret)
    fn = _loaded.get(cache_key)
    if fn is not None:
        return fn
    with _lock:
        fn = _loaded.get(cache_key)
        if fn is None:
            fn = _build(src, interpret, generic)
            _loaded[cache_key] = fn
    return fn


# Run-time sizes that count rows (a product's M, a conv's output pixels, a reduction's or an
# attention's rows): every kernel takes them unspecialized. Only loop bounds and masks across rows
# read them (never an address's alignment: row strides are parameters of their own), so Triton's
# divisibility-by-16 and value-1 specialization of them buys nothing, while it splits each bucket
# of shapes into more compiles (resnet50 on an H100: M = batch x 7 x 7 is a multiple of 16 at
# batch 16, not at 8, so batch 16's specialized kernels compiled again: 3.4 s to specialized).
# A batched product's batch sizes (``bsize0``, ...) split its program id alone. (Not a flat
# kernel's ``n`` or a gather's ``size{d}``: the divisibility of those lets Triton vectorize loads.)
ROW_COUNTS = frozenset({"M", "n_rows", "SQ", "SK"})
SPECIALIZE_ROWS = False  # True: row counts specialized as any integer (before 2026-12-08), to compare on a GPU


def is_row_count(name: str) -> bool:
    return not SPECIALIZE_ROWS and (name in ROW_COUNTS or (name.startswith("bsize") and name[5:].isdigit()))


@functools.lru_cache(maxsize=8192)
def row_count_positions(src: KernelSource) -> tuple:
    """Positions (in the parameter list) of ``src``'s run-time row counts (``is_row_count``)."""
    return tuple(j for j, (name, const) in enumerate(parameters(src)) if is_row_count(name) and not const)


def _build(src: KernelSource, interpret: bool, generic: bool):
    filename = f"<rtxjit-{src.name}-{src.short_key}>"
    linecache.cache[filename] = (len(src.text), None, src.text.splitlines(True), filename)
    namespace: dict = {"__name__": f"rtxjit_generated_{src.short_key}"}
    exec(compile(src.text, filename, "exec"), namespace)  # text generated this process, not read from a file
    fn = namespace[src.name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return _Serialized(InterpretedFunction(fn))
    from triton.runtime.jit import JITFunction

    if generic:
        runtime, prev = [], ""
        for name, const in parameters(src):
            if not const and not name.endswith("_ptr") and not prev.endswith("_ptr"):
                runtime.append(name)
            prev = name
        return JITFunction(fn, do_not_specialize=runtime)
    names = parameters(src)
    return JITFunction(fn, do_not_specialize=[names[j][0] for j in row_count_positions(src)])  # on the GPU: compiled on first launch, cached by Triton


_interpreter_lock = threading.RLock()


class _Serialized:
    """An interpreted kernel whose launches hold one process-wide lock: Triton's interpreter patches
    ``triton.language`` while a kernel runs, so two threads must not run kernels at once."""

    def __init__(self, fn):
        self.fn = fn

    def __getitem__(self, grid):
        launch = self.fn[grid]

        def run(*args, **kwargs):
            with _interpreter_lock:
                return launch(*args, **kwargs)

        return run
