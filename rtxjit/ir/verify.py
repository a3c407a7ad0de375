"""Graph verifier: names defined once and before use, outputs produced, ops known, types consistent."""

from __future__ import annotations

from rtxjit.errors import ModelError
from rtxjit.ir.graph import Graph
from rtxjit.ir.registry import Unknown, get_op


def verify(graph: Graph, check_types: bool = True) -> None:
    defined = {v.name for v in graph.inputs}
    defined.update(v.name for v in graph.constants())
    for node in graph.nodes:
        where = f"node '{node.name}' ({node.op})"
        opdef = get_op(node.op, where, node.version)
        infer_args = []
        for i, v in enumerate(node.inputs):
            if v is None:
                infer_args.append(None)
                continue
            if v.name not in defined:
                raise ModelError(f"{where}: input '{v.name}' is used before it is defined")
            if i in opdef.host_inputs:
                infer_args.append(v.const if v.is_const else Unknown(v.type))
            else:
                infer_args.append(v.type)
        for v in node.outputs:
            if v is None:
                continue
            if v.name in defined:
                raise ModelError(f"{where}: output '{v.name}' is defined twice")
            defined.add(v.name)
        if check_types:
            types = opdef.infer(infer_args, node.attrs, len(node.outputs))
            for v, t in zip(node.outputs, types):
                if v is not None and v.type != t:
                    raise ModelError(f"{where}: output '{v.name}' has type {v.type}, inference gives {t}")
    for v in graph.outputs:
        if v.name not in defined:
            raise ModelError(f"graph output '{v.name}' is never produced")
