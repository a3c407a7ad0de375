"""Every op, once. Importing this package fills the registry."""

from rtxjit.ir.ops import conv, elementwise, matmul, movement, pool, reduce, shape  # noqa: F401
