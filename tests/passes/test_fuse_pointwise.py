import numpy as np
import pytest

from rtxjit.passes.fuse_pointwise import fuse_pointwise
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16


def _chain(dtype, extra_outputs=None):
    """((x + b) * x) -> Gelu -> Cast to fp32 -> Clip: a tree of pointwise ops with broadcasting."""
    nodes = [node("Add", ["x", "b"], ["a"]), node("Mul", ["a", "x"], ["m"]), node("Gelu", ["m"], ["g"]),
             node("Cast", ["g"], ["c"], to=1), node("Clip", ["c", "lo", "hi"], ["y"])]
    outputs = {"y": (F32, [2, 3, 4]), **(extra_outputs or {})}
    inits = {"b": random((4,), dtype, 3), "lo": np.array(-0.5, F32), "hi": np.array(1.5, F32)}
    return model(nodes, {"x": (dtype, [2, 3, 4])}, outputs, inits, opset=20)


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_a_chain_becomes_one_kernel(dtype):
    m = _chain(dtype)
    _, g, modified = apply(fuse_pointwise, m, {"x": random((2, 3, 4), dtype)}, dtype, onnxruntime=dtype == F32)
    assert modified and ops(g) == {"rtxjit.Pointwise": 1}
    fused = g.nodes[0]
    assert [s[0] for s in fused.attrs["program"]] == ["Add", "Mul", "Gelu", "Cast", "Clip"]
    assert fused.outputs[0] is g.outputs[0]
    assert [v.name for v in fused.inputs] == ["x", "b", "lo", "hi"]  # x read twice, loaded once


def test_a_value_that_is_a_graph_output_ends_a_group():
    m = _chain(F32, extra_outputs={"m": (F32, [2, 3, 4])})
    _, g, _ = apply(fuse_pointwise, m, {"x": random((2, 3, 4))}, F32)
    assert ops(g) == {"rtxjit.Pointwise": 2}
    assert {n.outputs[0].name for n in g.nodes} == {"m", "y"}


def test_a_value_read_twice_inside_one_group_joins_it():
    nodes = [node("Exp", ["x"], ["e"]), node("Add", ["e", "x"], ["a"]), node("Mul", ["e", "x"], ["b"]),
             node("Sub", ["a", "b"], ["y"])]
    m = model(nodes, {"x": (F32, [5])}, {"y": (F32, [5])})
    _, g, _ = apply(fuse_pointwise, m, {"x": random((5,))}, F32)
    assert ops(g) == {"rtxjit.Pointwise": 1}
    assert [s[0] for s in g.nodes[0].attrs["program"]] == ["Exp", "Add", "Mul", "Sub"]


def test_a_value_read_by_two_groups_is_not_recomputed():
    nodes = [node("Exp", ["x"], ["e"]), node("Add", ["e", "x"], ["y"]), node("Mul", ["e", "x"], ["z"])]
    m = model(nodes, {"x": (F32, [5])}, {"y": (F32, [5]), "z": (F32, [5])})
    _, g, _ = apply(fuse_pointwise, m, {"x": random((5,))}, F32)
    assert ops(g) == {"Exp": 1, "Add": 1, "Mul": 1}


def test_nothing_to_fuse_is_unmodified():
    m = model([node("Relu", ["x"], ["y"])], {"x": (F32, [3])}, {"y": (F32, [3])})
    _, g, modified = apply(fuse_pointwise, m, {"x": random((3,))}, F32)
    assert not modified and ops(g) == {"Relu": 1}
