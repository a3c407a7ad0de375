"""IR dtypes as Triton names."""

from rtxjit.ir.types import DType

TL = {
    DType.FP32: "tl.float32",
    DType.FP16: "tl.float16",
    DType.BF16: "tl.bfloat16",
    DType.FP64: "tl.float64",
    DType.FP8E4M3: "tl.float8e4nv",
    DType.FP8E5M2: "tl.float8e5",
    DType.INT64: "tl.int64",
    DType.INT32: "tl.int32",
    DType.UINT64: "tl.uint64",
    DType.UINT32: "tl.uint32",
    DType.INT16: "tl.int16",
    DType.UINT16: "tl.uint16",
    DType.INT8: "tl.int8",
    DType.UINT8: "tl.uint8",
    DType.INT4: "tl.int8",  # held unpacked, one per byte (rtxjit/ir/types.py)
    DType.UINT4: "tl.uint8",
    DType.INT2: "tl.int8",
    DType.UINT2: "tl.uint8",
    DType.BOOL: "tl.int1",
}


def compute_type(dtype: DType) -> DType:
    """The type arithmetic runs in: narrow floats widen to fp32, everything else stays."""
    if dtype.is_float and dtype is not DType.FP64:
        return DType.FP32
    return dtype


def load_cast(dtype: DType) -> str:
    """Suffix that converts a loaded value to its compute type."""
    ct = compute_type(dtype)
    return "" if ct is dtype else f".to({TL[ct]})"
