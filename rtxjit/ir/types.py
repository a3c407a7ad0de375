"""Data types, dimensions and tensor types of the IR.

A dimension is an ``int`` or a symbol: a ``str`` naming it (``"batch"``) or an expression built from
other dims (``"(H+2)//2"``). Symbols are compared by name; the IR never evaluates them. Concrete
shapes replace symbols at run time (see ``rtxjit.plan.plan``).
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Callable, Union

import ml_dtypes
import numpy as np

from rtxjit.errors import NoNumpyDtypeError, ShapeError
from rtxjit.ir.symint import whole

Dim = Union[int, str]
Shape = tuple  # tuple[Dim, ...]


class DType(enum.Enum):
    """Element types. Value: (short name, ONNX TensorProto code, numpy dtype name, bytes).

    INT4 and UINT4 (INT2 and UINT2 alike) are unpacked, one value per byte: on the host as
    ``ml_dtypes.int4`` / ``uint4`` arrays (ONNX packs two per byte, four for 2 bits; the importer
    unpacks initializers, see ``rtxjit.onnx.importer.tensor_to_array``), so numpy references see
    the type and QuantizeLinear clamps to 4 bits when it folds; on the device as int8 / uint8
    tensors (a kernel loads bytes; only the ops that produce int4 need to know the narrower
    range). fp8 values have no numpy dtype (folding and host evaluation skip them); the IR holds
    fp8 constants as ``ml_dtypes`` arrays.
    """

    FP32 = ("fp32", 1, "float32", 4)
    FP16 = ("fp16", 10, "float16", 2)
    BF16 = ("bf16", 16, None, 2)
    FP8E4M3 = ("fp8e4m3", 17, None, 1)
    FP8E5M2 = ("fp8e5m2", 19, None, 1)
    FP64 = ("fp64", 11, "float64", 8)
    INT64 = ("int64", 7, "int64", 8)
    INT32 = ("int32", 6, "int32", 4)
    UINT64 = ("uint64", 13, "uint64", 8)
    UINT32 = ("uint32", 12, "uint32", 4)
    INT16 = ("int16", 5, "int16", 2)
    UINT16 = ("uint16", 4, "uint16", 2)
    INT8 = ("int8", 3, "int8", 1)
    UINT8 = ("uint8", 2, "uint8", 1)
    INT4 = ("int4", 22, "int4", 1)  # ml_dtypes' name (numpy's own "int4" is int32: see to_numpy)
    UINT4 = ("uint4", 21, "uint4", 1)
    INT2 = ("int2", 26, "int2", 1)  # ml_dtypes' name, as int4
    UINT2 = ("uint2", 25, "uint2", 1)
    BOOL = ("bool", 9, "bool", 1)

    @property
    def short(self) -> str:
        return self.value[0]

    @property
    def onnx_code(self) -> int:
        return self.value[1]

    @property
    def itemsize(self) -> int:
        return self.value[3]

    @property
    def is_float(self) -> bool:
        return self.short.startswith(("fp", "bf"))

    @property
    def is_int(self) -> bool:
        return self.short.startswith(("int", "uint"))

    def to_numpy(self) -> np.dtype:
        if self.value[2] is None:
            raise NoNumpyDtypeError(f"dtype {self.short} has no numpy dtype")
        if self in SUB_BYTE_INTS:
            return np.dtype(getattr(ml_dtypes, self.value[2]))
        return np.dtype(self.value[2])

    @staticmethod
    def from_onnx(code: int) -> "DType":
        for d in DType:
            if d.onnx_code == code:
                return d
        raise KeyError(code)

    @staticmethod
    def from_numpy(dt) -> "DType":
        name = np.dtype(dt).name
        for d in DType:
            if d.value[2] == name:
                return d
        raise KeyError(name)

    @staticmethod
    def from_short(name: str) -> "DType":
        for d in DType:
            if d.short == name:
                return d
        raise KeyError(name)

    def __repr__(self) -> str:
        return self.short


# held unpacked, one value per byte, as ml_dtypes arrays on the host (see DType)
SUB_BYTE_INTS = (DType.INT4, DType.UINT4, DType.INT2, DType.UINT2)


def is_static(shape: Shape) -> bool:
    return all(isinstance(d, int) for d in shape)


def numel(shape: Shape) -> Dim:
    return dim_op(lambda *ds: math.prod(ds), "*", *shape) if shape else 1


def dim_op(fn: Callable[..., int], symbol: str, *dims: Dim) -> Dim:
    """Apply ``fn`` to concrete dims; for symbolic ones build the expression ``a<symbol>b...``."""
    if all(isinstance(d, int) for d in dims):
        return whole(fn(*dims))
    return "(" + symbol.join(str(d) for d in dims) + ")"


@dataclass(frozen=True)
class TensorType:
    dtype: DType
    shape: Shape

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def static(self) -> bool:
        return is_static(self.shape)

    def with_shape(self, shape) -> "TensorType":
        return TensorType(self.dtype, tuple(shape))

    def with_dtype(self, dtype: DType) -> "TensorType":
        return TensorType(dtype, self.shape)

    def __str__(self) -> str:
        return f"{self.dtype.short}[{','.join(str(d) for d in self.shape)}]"


def broadcast_shapes(*shapes: Shape) -> Shape:
    """Numpy broadcasting over dims that may be symbolic; raises ValueError on a mismatch."""
    rank = max(len(s) for s in shapes)
    out = []
    for i in range(rank):
        dims = [s[i - rank + len(s)] for s in shapes if i - rank + len(s) >= 0]
        chosen: Dim = 1
        for d in dims:
            if d == 1 or d == chosen:
                continue
            if chosen == 1:
                chosen = d
            elif isinstance(d, int) and isinstance(chosen, int):
                raise ShapeError(f"shapes {shapes} do not broadcast")
            elif isinstance(chosen, str) and isinstance(d, int):
                chosen = d  # a symbol must equal the concrete dim it broadcasts with
        out.append(chosen)
    return tuple(out)
