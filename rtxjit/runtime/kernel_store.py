"""Triton's compiled kernels kept in rtxjit's runtime cache.

``KernelStore`` is a Triton cache manager (``triton.knobs.cache.manager_class``): when a runtime
cache is active, every kernel Triton compiles — in this process or in a compile worker — is stored
there as an entry of two blobs, its metadata JSON and its binary (cubin), keyed by Triton's own
hash of the kernel (source, specialization, options, target, Triton version) inside rtxjit's
``cache_key`` (which adds the codegen version). Loading checks every blob's sha256 (``RuntimeCache``);
a damaged entry is skipped with a warning and the kernel is compiled again and stored over it.
Blobs are written to a private scratch folder under Triton's file names for Triton to read.

Triton's launcher modules (``.so`` files Triton builds from C for a kernel signature) are host
code: they stay in Triton's own cache folder, never in rtxjit's cache.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Optional

from triton.runtime.cache import FileCacheManager

from rtxjit import config
from rtxjit.runtime.cache import RuntimeCache, cache_key

KEEP = (".json", ".cubin", ".hsaco")  # what a kernel needs at load; IR stages are not kept
HOST_CODE = (".so", ".pyd", ".dll", ".dylib")

_active: Optional[RuntimeCache] = None
_scratch: Optional[Path] = None
_lock = threading.Lock()


def activate(cache: Optional[RuntimeCache]) -> None:
    """Store Triton's kernels in ``cache`` from now on (None: Triton's own cache folder). One store
    per process: the runtime cache of the session created last."""
    global _active
    import triton

    with _lock:
        _active = cache
        if cache is not None:
            triton.knobs.cache.manager_class = KernelStore
            config.set_kernel_store_dir(str(cache.path))


def activate_from_env() -> None:
    path = config.kernel_store_dir()
    if path:
        activate(RuntimeCache(path))


def active() -> Optional[RuntimeCache]:
    return _active


def _scratch_dir() -> Path:
    global _scratch
    with _lock:
        if _scratch is None:
            _scratch = Path(tempfile.mkdtemp(prefix="rtxjit-kernels-"))
            atexit.register(shutil.rmtree, _scratch, True)
        return _scratch


class KernelStore(FileCacheManager):
    """Triton cache manager over the active runtime cache (Triton's file cache where none is)."""

    def __init__(self, key, override=False, dump=False):
        super().__init__(key, override, dump)
        self.store = None if (override or dump) else _active
        self.staging = _scratch_dir() / key if self.store is not None else None

    def _entry(self, filename: str) -> str:
        return cache_key(target="triton", kind="kernel", triton_key=self.key, file=filename)

    def _host_code(self, filename: str) -> bool:
        return filename.endswith(HOST_CODE)

    def get_group(self, filename: str):
        if self.store is None:
            return super().get_group(filename)
        hit = self.store.get(self._entry(filename))
        if hit is None:
            return None
        meta, blobs = hit
        files = meta.get("files") if isinstance(meta, dict) else None
        if (not isinstance(files, list) or filename not in files
                or any(not isinstance(f, str) or "/" in f or f.startswith(".") for f in files)
                or sorted(blobs) != sorted(f"f{i}" for i in range(len(files)))):
            return None
        self.staging.mkdir(parents=True, exist_ok=True)
        group = {}
        for i, name in enumerate(files):
            group[name] = self._stage(name, blobs[f"f{i}"])
        return group

    def _stage(self, filename: str, data: bytes) -> str:
        path = self.staging / filename
        tmp = path.with_name(f"{filename}.tmp.{os.getpid()}.{threading.get_ident()}")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return str(path)

    def put(self, data, filename, binary=True) -> str:
        if self.store is None or self._host_code(filename):
            return super().put(data, filename, binary)
        self.staging.mkdir(parents=True, exist_ok=True)
        return self._stage(filename, data if isinstance(data, bytes) else str(data).encode())

    def get_file(self, filename):
        if self.store is None or self._host_code(filename):
            return super().get_file(filename)
        path = self.staging / filename
        return str(path) if path.exists() else None

    def put_group(self, filename: str, group: dict):
        if self.store is None:
            return super().put_group(filename, group)
        kept = sorted(name for name in group if name.endswith(KEEP))
        blobs = {f"f{i}": Path(group[name]).read_bytes() for i, name in enumerate(kept)}
        try:
            self.store.put(self._entry(filename), {"files": kept}, blobs)
        except OSError as exc:
            import warnings

            warnings.warn(f"rtxjit: runtime cache {self.store}: cannot store kernel {filename}: {exc}",
                          RuntimeWarning)
        return str(self.staging / filename)
