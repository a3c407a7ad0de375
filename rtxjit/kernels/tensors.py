"""The one table between rtxjit's dtypes and torch's, for everything that makes or reads a tensor.

At the bottom of the runtime: the executor, the session, the copy kernel and the JIT's check all
read it from here (it was written in several modules, which imported each other for it)."""

from __future__ import annotations

import torch

from rtxjit.errors import InputError
from rtxjit.ir.types import DType

TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2,
}


def torch_dtype(dtype: DType) -> torch.dtype:
    return TORCH_DTYPES[dtype.short]


def dtype_of_torch(dt: torch.dtype, name: str) -> DType:
    """The DType of torch dtype ``dt``; an InputError naming input ``name`` if rtxjit has none."""
    for d in DType:
        if TORCH_DTYPES.get(d.short) == dt:
            return d
    raise InputError(f"input '{name}': dtype {dt} is not supported")
