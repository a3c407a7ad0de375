"""Which device runs the kernels: an NVIDIA GPU, or the CPU through Triton's interpreter."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional

from rtxjit import config
from rtxjit.errors import RtxjitError, UsageError


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu" (Triton's interpreter)
    name: str
    sm: Optional[int] = None  # compute capability as 80, 90, ... on a GPU
    # multiprocessors the tile heuristics size for: None reads them from the GPU here; an AOT build
    # for an absent GPU names the count it assumes (engine/aot.py)
    sm_count: Optional[int] = None

    @property
    def interpret(self) -> bool:
        return self.kind == "cpu"

    @property
    def torch_device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    @property
    def memory_bytes(self) -> int:
        """The device's memory (the host's RAM for the interpreter): no tensor can be larger."""
        return _memory_bytes(self.kind)

    def __str__(self) -> str:
        if self.kind == "cuda":
            return f"{self.name} (sm_{self.sm})"
        return "CPU (Triton interpreter)"


def detect(requested: Optional[str] = None) -> Device:
    """``requested`` ("cuda", "cpu" or None) wins over RTXJIT_DEVICE, which wins over detection."""
    import torch

    choice = requested or config.device_override()
    if choice not in (None, "cuda", "cpu", "gpu"):
        raise UsageError(f"unknown device '{choice}': use 'cuda' or 'cpu'")
    if choice in (None, "cuda", "gpu") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return Device("cuda", torch.cuda.get_device_name(), major * 10 + minor)
    if choice in ("cuda", "gpu"):
        raise RtxjitError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if not config.interpreter_enabled():
        raise RtxjitError("the CPU needs Triton's interpreter, which must be on before triton is imported: "
                          "set RTXJIT_DEVICE=cpu (or TRITON_INTERPRET=1), or import rtxjit before triton")
    return Device("cpu", "cpu")


@functools.lru_cache(maxsize=None)
def _memory_bytes(kind: str) -> int:
    if kind == "cuda":
        import torch

        if not torch.cuda.is_available():  # planning for a named SM target (engines built with no GPU)
            return 2 ** 63 - 1
        return torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # no sysconf: only the 2**63-byte bound holds
        return 2 ** 63 - 1
