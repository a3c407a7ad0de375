"""Every op, once. Importing this package fills the registry."""

from rtxjit.ir.ops import (attention, conv, conv_transpose, einsum, elementwise, fused, indexing,  # noqa: F401
                           matmul, movement, norm, pad, pool, reduce, resize, scan, shape)
