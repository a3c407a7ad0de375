"""Generated kernel source: deterministic text, its hash, and turning it into a Triton kernel.

The text is the cache key's main part, so it holds no ids, addresses or node names: the same
template, parameters and dtypes always give the same bytes. Kernels are created in memory from the
text that was just generated (never from stored text); the source is registered with ``linecache``
so Triton can read it back, as it does for functions defined in files.
"""

from __future__ import annotations

import hashlib
import linecache
import threading
from dataclasses import dataclass

PRELUDE = "import triton\nimport triton.language as tl\nfrom triton.language.extra import libdevice\n\n\n"


@dataclass(frozen=True)
class KernelSource:
    name: str  # the Python function name inside ``text``
    text: str

    @property
    def key(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()

    @property
    def short_key(self) -> str:
        return self.key[:12]


def render(name: str, header: str, body: str) -> KernelSource:
    text = f"# rtxjit kernel {name}: {header}\n" + PRELUDE + body.strip("\n") + "\n"
    return KernelSource(name, text)


_lock = threading.Lock()
_loaded: dict = {}


def load_kernel(src: KernelSource, interpret: bool):
    """The Triton kernel for ``src``: a JITFunction, or an InterpretedFunction for the CPU."""
    cache_key = (src.key, interpret)
    fn = _loaded.get(cache_key)
    if fn is not None:
        return fn
    with _lock:
        fn = _loaded.get(cache_key)
        if fn is None:
            fn = _build(src, interpret)
            _loaded[cache_key] = fn
    return fn


def _build(src: KernelSource, interpret: bool):
    filename = f"<rtxjit-{src.name}-{src.short_key}>"
    linecache.cache[filename] = (len(src.text), None, src.text.splitlines(True), filename)
    namespace: dict = {"__name__": f"rtxjit_generated_{src.short_key}"}
    exec(compile(src.text, filename, "exec"), namespace)  # text generated this process, not read from a file
    fn = namespace[src.name]
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    from triton.runtime.jit import JITFunction

    return JITFunction(fn)  # on the GPU: compiled on first launch, cached by Triton
