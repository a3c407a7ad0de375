import numpy as np

from rtxjit.passes.eliminate_common_subexpressions import canonical, eliminate_common_subexpressions
from tests.passes.helpers import apply, model, node, ops, random

F32 = np.float32
X = {"x": (F32, [2, 3])}


def test_same_op_inputs_and_attrs_merge():
    m = model([node("LeakyRelu", ["x"], ["a"], alpha=0.2), node("LeakyRelu", ["x"], ["b"], alpha=0.2),
               node("Add", ["a", "b"], ["y"])], X, {"y": (F32, [2, 3])})
    _, g, modified = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert modified and ops(g) == {"LeakyRelu": 1, "Add": 1}
    add = g.nodes[-1]
    assert add.inputs[0] is add.inputs[1]


def test_different_attrs_do_not_merge():
    m = model([node("LeakyRelu", ["x"], ["a"], alpha=0.2), node("LeakyRelu", ["x"], ["b"], alpha=0.3),
               node("Transpose", ["a"], ["ta"], perm=[1, 0]), node("Transpose", ["b"], ["tb"], perm=[1, 0]),
               node("Add", ["ta", "tb"], ["y"])], X, {"y": (F32, [3, 2])})
    _, g, modified = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"LeakyRelu": 2, "Transpose": 2, "Add": 1}


def test_default_attr_equals_the_explicit_default():
    m = model([node("Flatten", ["x"], ["a"]), node("Flatten", ["x"], ["b"], axis=1),
               node("Sub", ["a", "b"], ["y"])], X, {"y": (F32, [2, 3])})
    _, g, _ = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert ops(g) == {"Flatten": 1, "Sub": 1}


def test_identical_constants_merge_and_then_their_readers():
    w = random((2, 3), seed=3)
    m = model([node("Add", ["x", "w1"], ["a"]), node("Add", ["x", "w2"], ["b"]), node("Mul", ["a", "b"], ["y"])],
              X, {"y": (F32, [2, 3])}, {"w1": w, "w2": w.copy()})
    _, g, _ = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert ops(g) == {"Add": 1, "Mul": 1} and [c.name for c in g.constants()] == ["w1"]


def test_constants_with_the_same_bytes_but_another_dtype_or_shape_stay_apart():
    w = np.zeros((2, 3), F32)
    m = model([node("Add", ["x", "w1"], ["a"]), node("Add", ["x", "w2"], ["b"]), node("Mul", ["a", "b"], ["y"])],
              X, {"y": (F32, [2, 3])}, {"w1": w, "w2": w.reshape(1, 2, 3)})
    _, g, _ = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert len(g.constants()) == 2


def test_duplicate_that_is_a_graph_output_keeps_its_name():
    m = model([node("Exp", ["x"], ["a"]), node("Neg", ["a"], ["y"]), node("Exp", ["x"], ["z"])],
              X, {"y": (F32, [2, 3]), "z": (F32, [2, 3])})
    _, g, _ = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert ops(g) == {"Exp": 1, "Neg": 1} and g.nodes[0].outputs[0] is g.outputs[1]


def test_two_graph_outputs_both_stay():
    m = model([node("Exp", ["x"], ["y"]), node("Exp", ["x"], ["z"])], X, {"y": (F32, [2, 3]), "z": (F32, [2, 3])})
    _, g, modified = apply(eliminate_common_subexpressions, m, {"x": random((2, 3))})
    assert not modified and ops(g) == {"Exp": 2}


def test_canonical_attrs():
    a = np.arange(4, dtype=np.int64)
    assert canonical({"v": a, "p": [1, 2]}) == canonical({"p": (1, 2), "v": a.copy()})
    assert canonical(a) != canonical(a.astype(np.int32))
    assert canonical(a) != canonical(a.reshape(2, 2))
    assert canonical(np.float32(0.5)) == canonical(0.5)
