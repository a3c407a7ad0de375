import numpy as np
import pytest

from rtxjit.ir.rewrite import copy_graph
from rtxjit.onnx.importer import import_model
from rtxjit.passes.base import PassError
from rtxjit.passes.eliminate_dead_code import eliminate_dead_code
from tests.passes.helpers import apply, model, node, ops, random

F32 = np.float32


def _branchy():
    """y = Relu(x); dead = Neg(Exp(x) + w); z = Sigmoid(x) is a second output."""
    return model([node("Relu", ["x"], ["y"]), node("Exp", ["x"], ["e"]), node("Add", ["e", "w"], ["s"]),
                  node("Neg", ["s"], ["dead"]), node("Sigmoid", ["x"], ["z"])],
                 {"x": (F32, [2, 3])}, {"y": (F32, [2, 3]), "z": (F32, [2, 3])}, {"w": random((2, 3))})


def test_dead_nodes_and_their_constants_go_and_outputs_stay():
    before, g, modified = apply(eliminate_dead_code, _branchy(), {"x": random((2, 3))})
    assert modified and ops(g) == {"Relu": 1, "Sigmoid": 1}
    assert [c.name for c in before.constants()] == ["w"] and g.constants() == []
    assert [v.name for v in g.outputs] == ["y", "z"]


def test_graph_output_read_by_nothing_else_stays():
    m = model([node("Relu", ["x"], ["r"]), node("Neg", ["r"], ["y"])], {"x": (F32, [3])},
              {"r": (F32, [3]), "y": (F32, [3])})
    _, g, modified = apply(eliminate_dead_code, m, {"x": random((3,))})
    assert not modified and ops(g) == {"Relu": 1, "Neg": 1}


def test_node_with_one_live_output_stays():
    m = model([node("Split", ["x"], ["a", "b"], axis=0, num_outputs=2), node("Relu", ["a"], ["y"])],
              {"x": (F32, [4, 3])}, {"y": (F32, [2, 3])}, opset=18)
    _, g, _ = apply(eliminate_dead_code, m, {"x": random((4, 3))})
    assert ops(g) == {"Split": 1, "Relu": 1}


def test_postcondition_names_dead_nodes():
    g = import_model(_branchy())
    with pytest.raises(PassError, match="dead nodes"):
        eliminate_dead_code.ensures(copy_graph(g))
    eliminate_dead_code.ensures(eliminate_dead_code(g).graph)
