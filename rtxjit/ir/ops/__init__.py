"""Every op, once. Importing this package fills the registry."""

from rtxjit.ir.ops import attention, conv, elementwise, fused, matmul, movement, pool, reduce, scan, shape  # noqa: F401
