"""Values, nodes and graphs of the IR, and the readable text form (``print(graph)``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from rtxjit.ir.types import TensorType


@dataclass(eq=False)
class Value:
    """A tensor in the graph. ``const`` holds the data of a constant (an initializer)."""

    name: str
    type: TensorType
    const: Optional[np.ndarray] = None
    producer: Optional["Node"] = field(default=None, repr=False)

    @property
    def is_const(self) -> bool:
        return self.const is not None

    def __str__(self) -> str:
        return "%" + self.name


@dataclass(eq=False)
class Node:
    """One op application. ``inputs`` may hold ``None`` for an omitted optional input."""

    op: str
    name: str
    inputs: list
    outputs: list
    attrs: dict = field(default_factory=dict)
    version: int = 0  # the ONNX op version the node was imported at

    def __str__(self) -> str:
        outs = ", ".join(str(v) for v in self.outputs)
        ins = ", ".join("_" if v is None else str(v) for v in self.inputs)
        attrs = ""
        if self.attrs:
            attrs = " {" + ", ".join(f"{k}={_fmt_attr(v)}" for k, v in sorted(self.attrs.items())) + "}"
        types = ", ".join(str(v.type) for v in self.outputs)
        return f"{outs} = {self.op}({ins}){attrs} : {types}  # {self.name}"


def _fmt_attr(v: Any) -> str:
    if isinstance(v, np.ndarray):
        return f"tensor<{v.dtype}{list(v.shape)}>"
    if isinstance(v, float):
        return repr(float(v))
    return repr(v)


@dataclass(eq=False)
class Graph:
    name: str
    inputs: list  # list[Value], the graph's runtime inputs
    outputs: list  # list[Value]
    nodes: list  # list[Node], in topological order
    opset: int = 0

    def values(self) -> dict:
        """Every value by name: inputs, constants and node outputs."""
        out = {v.name: v for v in self.inputs}
        for node in self.nodes:
            for v in node.inputs:
                if v is not None:
                    out.setdefault(v.name, v)
            for v in node.outputs:
                out[v.name] = v
        for v in self.outputs:
            out.setdefault(v.name, v)
        return out

    def constants(self) -> list:
        return [v for v in self.values().values() if v.is_const]

    def consumers(self) -> dict:
        """Value name -> list of (node, input index)."""
        uses: dict = {}
        for node in self.nodes:
            for i, v in enumerate(node.inputs):
                if v is not None:
                    uses.setdefault(v.name, []).append((node, i))
        return uses

    def __str__(self) -> str:
        ins = ", ".join(f"%{v.name}: {v.type}" for v in self.inputs)
        outs = ", ".join(f"%{v.name}: {v.type}" for v in self.outputs)
        lines = [f"graph {self.name} (opset {self.opset}) ({ins}) -> ({outs}) {{"]
        for c in sorted(self.constants(), key=lambda v: v.name):
            lines.append(f"  %{c.name} = const {c.type}")
        lines.extend("  " + str(n) for n in self.nodes)
        lines.append("}")
        return "\n".join(lines)
