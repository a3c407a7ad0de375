"""Every environment variable rtxjit reads (or sets), here and nowhere else."""

from __future__ import annotations

import os
import sys


def device_override() -> str | None:
    """RTXJIT_DEVICE=cpu forces Triton's interpreter; =cuda forces the GPU."""
    value = os.environ.get("RTXJIT_DEVICE", "").strip().lower()
    return value or None


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def prepare_triton() -> None:
    """Turn on Triton's interpreter when kernels will run on the CPU.

    Triton reads TRITON_INTERPRET when its own library functions (``tl.sum``, ``tl.zeros``, ...) are
    decorated, that is when ``triton`` is first imported; so this runs before that import.
    """
    if "triton" in sys.modules or interpreter_enabled():
        return
    choice = device_override()
    if choice in ("cuda", "gpu"):
        return
    if choice != "cpu":
        import torch

        if torch.cuda.is_available():
            return
    os.environ["TRITON_INTERPRET"] = "1"


def light_compile() -> bool:
    """RTXJIT_LIGHT_COMPILE=1 compiles a new session's generic kernels in light worker processes
    (exec/packed.py) instead of threads of its own process. Off by default until timed on a GPU: the
    binaries are the same (tested), the cold start's gain is not measured yet."""
    return os.environ.get("RTXJIT_LIGHT_COMPILE", "0") == "1"


def fallback_buckets() -> bool:
    """RTXJIT_FALLBACKS=1: after a GPU session's first binding, the generic kernels of the other shape
    buckets around it are compiled in the background (jit/fallbacks.py). Off by default until
    ``pytest -m gpu`` has run with it: the first GPU run (2026-12-08, before its probes planned with
    detached static-size verdicts) failed a JIT test whose cause was not read back."""
    return os.environ.get("RTXJIT_FALLBACKS", "0") == "1"


def dump_passes() -> str | None:
    """RTXJIT_DUMP_PASSES=DIR writes the graph after every pass into DIR; =- writes it to stderr."""
    value = os.environ.get("RTXJIT_DUMP_PASSES", "").strip()
    return value or None


def skip_passes() -> frozenset:
    """RTXJIT_SKIP_PASSES=name,name leaves those steps of the pass pipeline out (an A/B of one pass on
    a GPU, benchmarks in subprocesses inheriting it); names as ``rtxjit.passes.PIPELINE`` has them."""
    return frozenset(n.strip() for n in os.environ.get("RTXJIT_SKIP_PASSES", "").split(",") if n.strip())


def verify_passes() -> bool:
    """RTXJIT_VERIFY_PASSES=1 runs the IR verifier after every pass (debug mode)."""
    return os.environ.get("RTXJIT_VERIFY_PASSES", "0") == "1"


def autotune_enabled() -> bool:
    """RTXJIT_AUTOTUNE=0 turns off timing tile configurations on first use (the heuristic's pick runs)."""
    return os.environ.get("RTXJIT_AUTOTUNE", "1") != "0"


def runtime_cache_dir() -> str | None:
    """RTXJIT_RUNTIME_CACHE=DIR gives sessions created without ``runtime_cache=`` that runtime cache
    directory (autotune decisions, the histogram of input shapes; cache/store.py)."""
    value = os.environ.get("RTXJIT_RUNTIME_CACHE", "").strip()
    return value or None


def gc_freeze() -> bool:
    """RTXJIT_GC_FREEZE=0 keeps a GPU session from freezing the garbage collector's heap when it is
    created (``jit.specializer.freeze_heap``)."""
    return os.environ.get("RTXJIT_GC_FREEZE", "1") != "0"


def specialize_mode() -> str | None:
    """RTXJIT_SPECIALIZE=lazy|eager|none: the default ``specialize`` mode of new sessions."""
    value = os.environ.get("RTXJIT_SPECIALIZE", "").strip().lower()
    return value or None


def compile_workers() -> int | None:
    """RTXJIT_COMPILE_WORKERS=N: worker processes for background compiles (default: a quarter of the
    CPU cores, at most 4). Each holds a CUDA context (~0.6 GB of GPU memory on an H100 with torch)."""
    value = os.environ.get("RTXJIT_COMPILE_WORKERS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None
