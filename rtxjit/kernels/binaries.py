"""Compiled kernels as data: a Triton binary (cubin) and what its launcher needs, stored and loaded
without Triton's JIT.

A warm start must not pay for Triton's JIT path on a cache hit (hashing Triton's own package for
its cache key, binding arguments, building a ``CompiledKernel`` from files: ~75 ms a kernel
measured on an H100). An *entry* here is the kernel's metadata (Triton's JSON, as written to its
cache), the launcher's description (the kernel's parameter names, their types and its constants)
and the cubin. ``load`` turns an entry into a ``Loaded`` kernel with the attributes ``Direct``
launches use (``run``, ``function``, ``packed_metadata``): the cubin is loaded into the current
CUDA context and Triton builds (or finds in its cache) the launcher for that signature, as it does
for its own kernels. Nothing here executes stored text: the cubin is device code the driver loads.

Entries are keyed by ``binary_key``: the kernel source's hash, generic or specialized, what
Triton's specialization sees of the arguments, and the constexprs (tile sizes, warps, stages);
the runtime cache's key adds the target SM, Triton's and rtxjit's codegen versions.
"""

from __future__ import annotations

import json
from collections import namedtuple
from types import SimpleNamespace
from typing import Optional

from rtxjit.errors import KernelError

BINARY_EXT = "cubin"


def binary_key(src_key: str, generic: bool, arg_classes: tuple, constexprs: dict) -> dict:
    """The components that identify one compilation of a kernel source (JSON-able)."""
    return {"kind": "binary", "source": src_key, "generic": bool(generic),
            "args": json.loads(json.dumps(arg_classes)), "constexprs": sorted(constexprs.items())}


def entry_of(kernel) -> Optional[tuple]:
    """``(meta, cubin bytes)`` of a Triton ``CompiledKernel``; None for one that is not a CUDA
    binary compiled from source (nothing to store)."""
    if isinstance(kernel, Loaded):
        return kernel.entry
    src = getattr(kernel, "src", None)
    asm = getattr(kernel, "asm", None)
    if src is None or asm is None or BINARY_EXT not in asm or not hasattr(src, "signature"):
        return None
    metadata = {k: _plain(v) for k, v in kernel.metadata._asdict().items()}
    constants = [[list(k) if isinstance(k, tuple) else k, _plain(v)] for k, v in getattr(src, "constants", {}).items()]
    # the signature as pairs: its order is the parameters' order (stored JSON sorts object keys)
    meta = {"metadata": metadata, "signature": [[k, v] for k, v in src.signature.items()], "constants": constants,
            "arg_names": list(src.fn.arg_names), "name": kernel.name}
    try:
        json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError):
        return None
    return meta, bytes(asm[BINARY_EXT])


def _plain(v):
    if hasattr(v, "backend") and hasattr(v, "arch"):  # GPUTarget
        return {"backend": v.backend, "arch": v.arch, "warp_size": v.warp_size}
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v


class Loaded:
    """A kernel loaded from an entry: ``run`` (Triton's launcher), ``function`` (the CUfunction)
    and ``packed_metadata``, as a ``CompiledKernel`` has them once its handles are initialized."""

    def __init__(self, meta: dict, cubin: bytes):
        self.entry = (meta, cubin)  # what it was loaded from (stored again by a later session's store)
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime import driver

        metadata = dict(meta["metadata"])
        t = metadata["target"]
        metadata["target"] = GPUTarget(t["backend"], t["arch"], t["warp_size"])
        self.metadata = namedtuple("KernelMetadata", sorted(metadata))(**metadata)
        self.packed_metadata = make_backend(self.metadata.target).pack_metadata(self.metadata)
        self.name = meta["name"]
        constants = {tuple(k) if isinstance(k, list) else k: v for k, v in meta["constants"]}
        src = SimpleNamespace(signature={k: v for k, v in meta["signature"]}, constants=constants,
                              fn=SimpleNamespace(arg_names=list(meta["arg_names"])))
        device = driver.active.get_current_device()
        self.run = driver.active.launcher_cls(src, self.metadata)
        self.module, self.function, self.n_regs, self.n_spills, n_max_threads = driver.active.utils.load_binary(
            self.name, cubin, self.metadata.shared, device)
        if self.metadata.num_warps * self.metadata.warp_size > n_max_threads:
            raise KernelError(f"kernel {self.name}: {self.metadata.num_warps} warps exceed the "
                               f"{n_max_threads} threads it can run with")


def load(meta: dict, cubin: bytes) -> Loaded:
    """Load an entry onto the current GPU (raises if it does not fit: wrong SM, too much memory)."""
    target = meta["metadata"]["target"]
    from triton.runtime import driver

    current = driver.active.get_current_target()
    if (target["backend"], target["arch"]) != (current.backend, current.arch):
        raise KernelError(f"kernel {meta.get('name')} was built for {target['backend']} {target['arch']}, "
                           f"this GPU is {current.backend} {current.arch}")
    return Loaded(meta, cubin)
