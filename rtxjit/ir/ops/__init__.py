"""Every op, once. Importing this package fills the registry."""

from rtxjit.ir.ops import (attention, conv, einsum, elementwise, fused, indexing, matmul, movement, norm,  # noqa: F401
                           pad, pool, reduce, resize, scan, shape)
