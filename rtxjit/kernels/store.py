"""A session's compiled kernels: where its binaries are looked up and where they are written.

Each ``InferenceSession`` builds one ``KernelStore`` (the session is the composition root) and
hands it to what needs it: its executables (launchers of stored kernels), the compiler (kernels it
compiles are written here) and the warm start (jit/warm.py). Nothing about it is process-wide:
two sessions of one process with different runtime caches each write only their own kernels there
(issue 16: the process-wide store of old belonged to the session created last).

One copy of each binary. A compiled kernel is kept in the runtime cache once, as a binary entry
(kernels/binaries.py: Triton's metadata, the launcher's description and the cubin) under its
binary key (``kernel_keys.item_key``: source hash, specialization, tile configuration, target, Triton and
codegen versions). Triton's own cache manager is left as it is: Triton keeps its compile stages and
launcher modules (host code built from C) in its own folder, never in rtxjit's runtime cache.

Sources. Binaries are looked up in the session's runtime cache and in the engines it serves
(``EngineBinaries``), in the order added; a binary loaded onto the GPU is remembered under its key
(a miss too, until a source is added). Loading checks every blob's sha256 (``RuntimeCache.get``);
a damaged entry is skipped with a warning and the kernel is compiled again and stored over it.
"""

from __future__ import annotations

import threading
import warnings
import weakref
from rtxjit.kernels import binaries


_UNSEEN = object()


class KernelStore:
    """Compiled kernels of one session: ``find(key)`` loads a stored binary, ``put(key, kernel)``
    writes a kernel compiled for this session into its runtime cache (``cache``; None: kernels are
    only looked up, in the sources added)."""

    def __init__(self, cache=None):
        self.cache = cache
        self._sources: list = [] if cache is None else [cache]
        self._found: dict = {}  # binary key -> a loaded kernel, or None (looked up everywhere, absent)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"KernelStore({self.cache})"

    def add_source(self, source) -> None:
        """Look up binaries in ``source`` too (an object with ``get(key) -> (meta, blobs) | None``:
        a RuntimeCache, or ``EngineBinaries``); forgets earlier misses."""
        with self._lock:
            self._sources[:] = [s for s in self._sources if getattr(s, "alive", True)]  # engines dropped since
            if not any(s is source or s == source for s in self._sources):
                self._sources.append(source)
            for key in [k for k, v in self._found.items() if v is None]:
                del self._found[key]

    def has_sources(self) -> bool:
        return bool(self._sources)

    def remember(self, key: str, kernel) -> None:
        """A kernel loaded in this process under ``key`` (later lookups need no store)."""
        with self._lock:
            self._found[key] = kernel

    def find(self, key: str):
        """The kernel stored under binary key ``key``, loaded onto the current GPU; None if no source
        has it (or it does not load here: another SM, too much shared memory)."""
        with self._lock:
            if key in self._found:
                return self._found[key]
            sources = list(self._sources)
        kernel = None
        for source in sources:
            entry = source.get(key)
            if entry is None:
                continue
            meta, blobs = entry
            try:
                kernel = binaries.load(meta, bytes(blobs["cubin"]))
                break
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                warnings.warn(f"rtxjit: the stored kernel {key[:12]} in {source} cannot be loaded ({exc}); "
                              "it is compiled again", RuntimeWarning)
        with self._lock:
            return self._found.setdefault(key, kernel)

    def holds(self, key: str) -> bool:
        """Whether the runtime cache has an entry under ``key`` (not checked: ``find`` checks)."""
        return self.cache is not None and (self.cache.path / f"{key}.json").exists()

    def put_entry(self, key: str, meta: dict, cubin: bytes) -> None:
        """Write a binary entry (``binaries.entry_of``) into the runtime cache, unless it is there; a
        failing write only warns (the kernel is compiled again by a later process)."""
        with self._lock:
            damaged = key in self._found and self._found[key] is None
        if self.cache is None or (self.holds(key) and not damaged):
            return
        self._write(key, meta, cubin)

    def _write(self, key: str, meta: dict, cubin: bytes) -> None:
        try:
            self.cache.put(key, meta, {"cubin": cubin})
        except OSError as exc:
            warnings.warn(f"rtxjit: runtime cache {self.cache}: cannot store kernel {meta.get('name')}: {exc}",
                          RuntimeWarning)

    def put(self, key: str, kernel) -> bool:
        """Keep ``kernel`` (a Triton ``CompiledKernel``, or one loaded from a store) under ``key``:
        remembered as loaded, and written into the runtime cache if it is not there. False if it
        cannot be stored (not a CUDA binary compiled from source)."""
        with self._lock:
            known = self._found.get(key, _UNSEEN)
        if known is not None and known is not _UNSEEN:  # stored or loaded here before: no file to check
            return True
        # written unless an entry is there; one looked up and found absent or damaged (None) is overwritten
        if self.cache is not None and (known is None or not self.holds(key)):
            entry = binaries.entry_of(kernel)
            if entry is None:
                return False
            self._write(key, *entry)
        self.remember(key, kernel)
        return True


class EngineBinaries:
    """An engine's compiled kernels (engine/aot.py) as a source of binaries. It holds the engine
    weakly: a dropped engine (and its weights) is not kept alive by a store; its kernels already
    loaded stay usable (``KernelStore.find`` remembers them)."""

    def __init__(self, engine):
        self._engine = weakref.ref(engine)
        self.name = str(engine.path or "(in memory)")

    @property
    def alive(self) -> bool:
        return self._engine() is not None

    def __eq__(self, other) -> bool:
        return isinstance(other, EngineBinaries) and other._engine() is self._engine() is not None

    __hash__ = object.__hash__

    def __repr__(self) -> str:
        return f"engine {self.name}"

    def get(self, key: str):
        engine = self._engine()
        entry = None if engine is None else engine.binaries.get(key)
        return None if entry is None else (entry["meta"], {"cubin": entry["data"]})

