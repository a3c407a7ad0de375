"""Concat runs in one launch (each output element loaded from its input alone): Swin's patch
merging (four strided slices), a roll (two slices of one tensor, swapped), several dtypes, empty
inputs, values kept bit for bit (-0.0, NaN, inf), and more inputs than one launch takes."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import rtxjit
from rtxjit.ops import movement

ONNX_TYPE = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16, np.int64: TensorProto.INT64,
             np.bool_: TensorProto.BOOL}


def _slice(name, src, out, starts, ends, axes, steps):
    consts = [numpy_helper.from_array(np.array(v, np.int64), f"{name}_{k}")
              for k, v in (("s", starts), ("e", ends), ("a", axes), ("p", steps))]
    return helper.make_node("Slice", [src] + [c.name for c in consts], [out], name=name), consts


def _run(nodes, inits, x: np.ndarray):
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", ONNX_TYPE[x.dtype.type], list(x.shape))],
                              [helper.make_tensor_value_info("y", ONNX_TYPE[x.dtype.type], None)], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    sess = rtxjit.InferenceSession(proto.SerializeToString())
    (got,) = sess.run(None, {"x": x})
    (want,) = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert got.shape == want.shape and got.dtype == want.dtype
    assert np.array_equal(got.view(np.uint8), want.view(np.uint8))  # bit for bit: a copy converts nothing
    return [s.kernel.name for s in sess.last_executable.plan.steps]


def test_patch_merging_concatenates_four_strided_slices_in_one_launch():
    x = np.random.default_rng(0).standard_normal((1, 8, 8, 6)).astype(np.float16)
    nodes, inits = [], []
    for k, (h0, w0) in enumerate([(0, 0), (1, 0), (0, 1), (1, 1)]):
        node, consts = _slice(f"s{k}", "x", f"p{k}", [h0, w0], [8, 8], [1, 2], [2, 2])
        nodes.append(node)
        inits += consts
    nodes.append(helper.make_node("Concat", [f"p{k}" for k in range(4)], ["y"], axis=-1))
    assert _run(nodes, inits, x) == ["concat"]


@pytest.mark.parametrize("dtype", [np.float32, np.int64, np.bool_], ids=["fp32", "int64", "bool"])
def test_a_roll_is_one_launch(dtype):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((2, 7, 5)) * 10).astype(dtype)
    if dtype is np.float32:
        x[0, 0, :3] = [-0.0, np.nan, -np.inf]
    a, consts_a = _slice("a", "x", "tail", [3], [7], [1], [1])
    b, consts_b = _slice("b", "x", "head", [0], [3], [1], [1])
    nodes = [a, b, helper.make_node("Concat", ["tail", "head"], ["y"], axis=1)]
    assert _run(nodes, consts_a + consts_b, x) == ["concat"]


def test_empty_inputs_are_skipped_and_one_input_left_is_a_copy():
    x = np.random.default_rng(2).standard_normal((3, 4)).astype(np.float32)
    e, consts = _slice("e", "x", "empty", [0], [0], [1], [1])
    nodes = [e, helper.make_node("Concat", ["empty", "x", "empty"], ["c"], axis=1),
             helper.make_node("Neg", ["c"], ["y"])]
    assert "concat" not in _run(nodes, consts, x)


def test_more_inputs_than_one_launch_takes_run_one_copy_each():
    n = movement.CONCAT_MAX_INPUTS + 1
    x = np.random.default_rng(3).standard_normal((2, 3)).astype(np.float32)
    nodes = [helper.make_node("Neg", ["x"], [f"n{k}"]) for k in range(n)]
    nodes.append(helper.make_node("Concat", [f"n{k}" for k in range(n)], ["y"], axis=0))
    names = _run(nodes, [], x)
    assert "concat" not in names
