"""Every op, once. Importing this package fills the registry."""

from rtxjit.ir.ops import (attention, conv, einsum, elementwise, fused, indexing, matmul, movement, pool,  # noqa: F401
                           reduce, scan, shape)
