"""Making a strided torch tensor contiguous with rtxjit's own copy kernel (no torch compute)."""

from __future__ import annotations

import torch

from rtxjit.codegen.source import load_kernel
from rtxjit.codegen.templates.pointwise import render_pointwise
from rtxjit.codegen.view import collapse, contiguous_strides
from rtxjit.ir.types import DType
from rtxjit.kernels.tensors import dtype_of_torch


def contiguous(t: torch.Tensor, device) -> torch.Tensor:
    dtype: DType = dtype_of_torch(t.dtype, "tensor")
    out = torch.empty(t.shape, dtype=t.dtype, device=t.device)
    n = t.numel()
    if n == 0:
        return out
    shape, (ost, ist) = collapse(tuple(t.shape), contiguous_strides(tuple(t.shape)), tuple(t.stride()))
    src = render_pointwise("x0", (dtype,), dtype, len(shape), wide=n > 2**31 - 1)
    block = 1024
    base = t.as_strided((t.untyped_storage().nbytes() // t.element_size(),), (1,), 0)
    load_kernel(src, device.interpret)[(-(-n // block),)](
        out, 0, base, t.storage_offset(), n, *shape, *ost, *ist, BLOCK=block)
    return out
