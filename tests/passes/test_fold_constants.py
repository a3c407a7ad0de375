import functools

import numpy as np
import pytest

from rtxjit import InferenceSession
import importlib
from rtxjit.passes.fold_constants import fold_constants
from tests.passes.helpers import apply, model, node, ops, random

F32, F16 = np.float32, np.float16
fold_module = importlib.import_module("rtxjit.passes.fold_constants")


@pytest.mark.parametrize("dtype", [F32, F16], ids=["fp32", "fp16"])
def test_chain_of_constant_nodes_folds_to_one_constant(dtype):
    a, b = random((3, 4), dtype, 1), random((3, 4), dtype, 2)
    m = model([node("Add", ["a", "b"], ["s"]), node("Sqrt", ["s2"], ["r"]), node("Mul", ["s", "s"], ["s2"]),
               node("Mul", ["x", "r"], ["y"])],
              {"x": (dtype, [3, 4])}, {"y": (dtype, [3, 4])}, {"a": a, "b": b})
    _, g, modified = apply(fold_constants, m, {"x": random((3, 4), dtype)}, dtype)
    assert modified and ops(g) == {"Mul": 1}
    folded = g.nodes[0].inputs[1]
    s = (a.astype(np.float64) + b).astype(dtype)  # each node rounds to its dtype
    want = np.sqrt(s.astype(np.float64) ** 2).astype(dtype)
    assert folded.name == "r" and folded.const.dtype == dtype
    np.testing.assert_array_equal(folded.const, want)


def test_transpose_of_a_weight_folds():
    w = random((4, 3))
    m = model([node("Transpose", ["w"], ["wt"], perm=[1, 0]), node("MatMul", ["x", "wt"], ["y"])],
              {"x": (F32, [2, 3])}, {"y": (F32, [2, 4])}, {"w": w})
    _, g, _ = apply(fold_constants, m, {"x": random((2, 3))})
    assert ops(g) == {"MatMul": 1}
    np.testing.assert_array_equal(g.nodes[0].inputs[1].const, w.T)


def test_view_of_a_large_constant_folds_only_where_nothing_else_reads_the_constant(monkeypatch):
    monkeypatch.setattr(fold_module, "SHARED_VIEW_LIMIT", 8)  # w's 12 elements count as a large weight
    w = random((2, 6))
    shape = np.array([3, 4], np.int64)
    alone = model([node("Reshape", ["w", "s"], ["v"]), node("Add", ["x", "v"], ["y"])],
                  {"x": (F32, [3, 4])}, {"y": (F32, [3, 4])}, {"w": w, "s": shape})
    _, g, _ = apply(fold_constants, alone, {"x": random((3, 4))})
    assert ops(g) == {"Add": 1}
    shared = model([node("Reshape", ["w", "s"], ["v"]), node("Add", ["x", "v"], ["y"]),
                    node("Add", ["z", "w"], ["y2"])],
                   {"x": (F32, [3, 4]), "z": (F32, [2, 6])}, {"y": (F32, [3, 4]), "y2": (F32, [2, 6])},
                   {"w": w, "s": shape})
    _, g, modified = apply(fold_constants, shared, {"x": random((3, 4)), "z": random((2, 6))})
    assert not modified and ops(g) == {"Reshape": 1, "Add": 2}


def test_output_over_the_size_limit_is_not_folded():
    m = model([node("Neg", ["a"], ["n"]), node("Add", ["x", "n"], ["y"])],
              {"x": (F32, [3, 4])}, {"y": (F32, [3, 4])}, {"a": random((3, 4))})
    _, g, modified = apply(functools.partial(fold_constants, numel_limit=8), m, {"x": random((3, 4))})
    assert not modified and ops(g) == {"Neg": 1, "Add": 1}


def test_folded_graph_output_keeps_its_name():
    m = model([node("Neg", ["a"], ["n"]), node("Relu", ["x"], ["y"])],
              {"x": (F32, [4])}, {"y": (F32, [4]), "n": (F32, [4])}, {"a": random((4,))})
    _, g, _ = apply(fold_constants, m, {"x": random((4,))})
    assert ops(g) == {"Relu": 1} and g.outputs[1].name == "n" and g.outputs[1].is_const


def test_node_reading_a_graph_input_is_not_folded():
    m = model([node("Add", ["x", "a"], ["y"])], {"x": (F32, [4])}, {"y": (F32, [4])}, {"a": random((4,))})
    _, g, modified = apply(fold_constants, m, {"x": random((4,))})
    assert not modified and ops(g) == {"Add": 1}


def test_a_folded_scalar_stays_0_d():
    """DINOv2's TorchScript export computes a grid side as Cast(Pow(4.0, 0.5)) of scalar constants and
    Unsqueezes it twice into the Concat that shapes a Reshape (a view of a constant read twice
    is not folded): the folded constant must keep shape ()
    (np.ascontiguousarray made it (1,), and the host Concat of the Unsqueezed [1, 1] with the other
    [1] pieces raised)."""
    m = model([node("Pow", ["a", "b"], ["p"]), node("Cast", ["p"], ["c"], to=7),
               node("Unsqueeze", ["c", "ax"], ["u"]), node("Unsqueeze", ["c", "ax"], ["u2"]),
               node("Shape", ["x"], ["n"], end=1), node("Div", ["n", "u2"], ["n2"]),
               node("Concat", ["u", "n2", "k"], ["shape"], axis=0), node("Reshape", ["x", "shape"], ["y"])],
              {"x": (F32, ["b", 4])}, {"y": (F32, [2, None, 4])},
              {"a": np.array(4.0, F32), "b": np.array(0.5, F32), "ax": np.array([0], np.int64),
               "k": np.array([4], np.int64)})
    x = random((6, 4))
    (y,) = InferenceSession(m).run(None, {"x": x})
    np.testing.assert_array_equal(y, x.reshape(2, 3, 4))  # [2, b / 2, 4]


def test_view_of_a_small_shared_constant_folds_and_what_it_feeds_folds_too():
    """Swin's shifted-window mask: a small constant read by two views, the mask built from them."""
    w = random((2, 6))
    shape = np.array([3, 4], np.int64)
    m = model([node("Reshape", ["w", "s"], ["v"]), node("Neg", ["v"], ["nv"]), node("Add", ["x", "nv"], ["y"]),
               node("Add", ["z", "w"], ["y2"])],
              {"x": (F32, [3, 4]), "z": (F32, [2, 6])}, {"y": (F32, [3, 4]), "y2": (F32, [2, 6])},
              {"w": w, "s": shape})
    _, g, modified = apply(fold_constants, m, {"x": random((3, 4)), "z": random((2, 6))})
    assert modified and ops(g) == {"Add": 2}  # the Reshape folded, then the Neg reading it
