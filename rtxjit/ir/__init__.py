"""The typed IR: dtypes, shapes, values, nodes, graphs, the op registry and the verifier."""

from rtxjit.ir.graph import Graph, Node, Value  # noqa: F401
from rtxjit.ir.registry import Kind, OpDef, all_ops, get_op, op  # noqa: F401
from rtxjit.ir.types import DType, TensorType  # noqa: F401
