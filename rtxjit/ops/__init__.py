"""Every op, once: one module per op family, each op declared with ``@op`` (rtxjit/ir/registry.py).

Importing this package fills the registry. ``rtxjit/__init__.py`` imports it, so the registry is
full wherever any part of rtxjit is imported; the registry itself (a layer below) never imports
the ops. Ops depend on ir and codegen only, never on the runtime: what a lowering needs to know
about the device comes on its ``ctx``."""

from rtxjit.ops import (attention, conv, conv_transpose, einsum, elementwise, fused, indexing,  # noqa: F401
                        matmul, movement, norm, pad, pool, quant, reduce, resize, scan, shape)
