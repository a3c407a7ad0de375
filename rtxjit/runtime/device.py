"""Which device runs the kernels: an NVIDIA GPU, or the CPU through Triton's interpreter."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from rtxjit import config
from rtxjit.errors import RtxjitError


@dataclass(frozen=True)
class Device:
    kind: str  # "cuda" or "cpu" (Triton's interpreter)
    name: str
    sm: Optional[int] = None  # compute capability as 80, 90, ... on a GPU

    @property
    def interpret(self) -> bool:
        return self.kind == "cpu"

    @property
    def torch_device(self) -> str:
        return "cuda" if self.kind == "cuda" else "cpu"

    def __str__(self) -> str:
        if self.kind == "cuda":
            return f"{self.name} (sm_{self.sm})"
        return "CPU (Triton interpreter)"


def detect(requested: Optional[str] = None) -> Device:
    """``requested`` ("cuda", "cpu" or None) wins over RTXJIT_DEVICE, which wins over detection."""
    import torch

    choice = requested or config.device_override()
    if choice not in (None, "cuda", "cpu", "gpu"):
        raise RtxjitError(f"unknown device '{choice}': use 'cuda' or 'cpu'")
    if choice in (None, "cuda", "gpu") and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        return Device("cuda", torch.cuda.get_device_name(), major * 10 + minor)
    if choice in ("cuda", "gpu"):
        raise RtxjitError("device 'cuda' was asked for but torch sees no CUDA GPU")
    if not config.interpreter_enabled():
        raise RtxjitError("the CPU needs Triton's interpreter, which must be on before triton is imported: "
                          "set RTXJIT_DEVICE=cpu (or TRITON_INTERPRET=1), or import rtxjit before triton")
    return Device("cpu", "cpu")
