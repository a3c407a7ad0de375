"""The one table between rtxjit's dtypes and torch's, for everything that makes or reads a tensor.

At the bottom of the runtime: the executor, the session, the copy kernel and the JIT's check all
read it from here (it was written in several modules, which imported each other for it)."""

from __future__ import annotations

import numpy as np
import torch

from rtxjit.errors import InputError
from rtxjit.ir.types import SUB_BYTE_INTS, DType

TORCH_DTYPES = {
    "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64,
    "int64": torch.int64, "int32": torch.int32, "uint64": torch.uint64, "uint32": torch.uint32, "int16": torch.int16, "uint16": torch.uint16,
    "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool, "fp8e4m3": torch.float8_e4m3fn, "fp8e5m2": torch.float8_e5m2,
    "int4": torch.int8, "uint4": torch.uint8, "int2": torch.int8, "uint2": torch.uint8,  # unpacked, one per
    # byte (rtxjit/ir/types.py)
}


_BY_DTYPE = {d: TORCH_DTYPES[d.short] for d in DType if d.short in TORCH_DTYPES}


def torch_dtype(dtype: DType) -> torch.dtype:
    """(By the member itself: a new binding asks this of every buffer argument of every launch,
    and reading an enum's property costs ~0.5 us.)"""
    got = _BY_DTYPE.get(dtype)
    return TORCH_DTYPES[dtype.short] if got is None else got


def host_tensor(data: np.ndarray, dtype: DType) -> torch.Tensor:
    """A CPU tensor of ``dtype`` holding the IR's array ``data`` (C-contiguous, flat or not).
    torch.from_numpy refuses ``ml_dtypes`` arrays: int4 / uint4 / int2 / uint2 become their values
    in int8 / uint8 (ml_dtypes keeps a 4-bit value in the low half of its byte, not sign-extended), fp8
    crosses as its bits; bf16 (held as float32 values) converts."""
    if dtype in SUB_BYTE_INTS:
        data = data.astype(np.int8 if dtype in (DType.INT4, DType.INT2) else np.uint8)
    if dtype in (DType.FP8E4M3, DType.FP8E5M2) and data.dtype.itemsize == 1:
        return torch.from_numpy(data.view(np.uint8).copy()).view(torch_dtype(dtype))
    return torch.from_numpy(data if data.flags.writeable else data.copy()).to(torch_dtype(dtype))


_FROM_TORCH: dict = {}  # torch dtype -> DType (dtype_of_torch runs per feed per request)


def dtype_of_torch(dt: torch.dtype, name: str) -> DType:
    """The DType of torch dtype ``dt``; an InputError naming input ``name`` if rtxjit has none."""
    hit = _FROM_TORCH.get(dt)
    if hit is not None:
        return hit
    for d in DType:
        if TORCH_DTYPES.get(d.short) == dt:
            _FROM_TORCH[dt] = d
            return d
    raise InputError(f"input '{name}': dtype {dt} is not supported")
